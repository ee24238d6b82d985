// The live block map: polls api/run and api/blocks and redraws in place, never reloading.
"use strict";

const POLL_MS = 1000;
const RETRY_MS = 5000;
const PICTURE_CELLS = 256;         // cells along the picture's longer side
const PICTURE_PIXELS = 512;        // the picture's longer side on the page, at most
const MAX_CELL_PIXELS = 32;        // a small grid's blocks are drawn this large at most
const ONE_ROW_PIXELS = 24;         // the height of a picture of one row (a 1D grid)
const PICTURE_LOAD_FACTOR = 20;    // wait this many times a picture's compute time (tracking.py)
const HOVER_HINT = "point at the picture for a block's state";
const STATES = ["waiting", "ready", "processing", "done", "failed", "orphaned"];  // legend order
let stateOfCode = [];              // the digit i of a picture is the state stateOfCode[i] (api/run)
const COLOURS = {};                // state name -> [r, g, b], read from the CSS variables
const views = new Map();           // task id -> the DOM and query state of its section

function readColours() {
  const style = getComputedStyle(document.documentElement);
  for (const state of STATES) {
    const hex = style.getPropertyValue(`--${state}`).trim().replace("#", "");
    COLOURS[state] = [0, 2, 4].map((start) => parseInt(hex.slice(start, start + 2), 16));
  }
}

function element(tag, attributes = {}, text = null) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== null) node.textContent = text;
  return node;
}

async function getJson(url) {
  const response = await fetch(url, { cache: "no-store" });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  seconds = Math.round(seconds);
  const hours = Math.floor(seconds / 3600);
  const minutes = Math.floor((seconds % 3600) / 60);
  const rest = seconds % 60;
  if (hours) return `${hours} h ${String(minutes).padStart(2, "0")} min`;
  if (minutes) return `${minutes} min ${String(rest).padStart(2, "0")} s`;
  return `${rest} s`;
}

function axisName(axis, dims) {
  const names = { 3: ["z"], 4: ["t", "z"] }[dims];
  return names ? names[axis] : `axis ${axis}`;
}

function planeAxisNames(dims) {
  if (dims === 1) return ["", "x"];
  if (dims <= 4) return ["y", "x"];
  return [`axis ${dims - 2}`, `axis ${dims - 1}`];
}

function buildLegend() {
  const legend = document.getElementById("legend");
  for (const state of STATES) {
    const item = element("li", { "data-state": state });
    item.append(element("span", { class: "swatch", style: `background: var(--${state})` }), state);
    legend.append(item);
  }
}

// ------------------------------------------------------------------ one task's section
function createView(task) {
  const dims = task.grid_shape.length;
  const section = element("section", { class: "task", "data-task-id": task.task_id });
  section.append(element("h2", {}, task.task_id));
  const counts = element("div", { class: "counts" });
  const countNodes = {};
  for (const [name, label] of [["done", "done"], ["failed", "failed"], ["total", "total"],
    ["rate", "blocks/s"], ["eta", "ETA"], ["processing", "processing"], ["ready", "ready"],
    ["waiting", "waiting"], ["orphaned", "orphaned"], ["workers", "worker processes"]]) {
    const span = element("span", { "data-count": name });
    const value = element("b", {}, "–");
    span.append(`${label} `, value);
    counts.append(span);
    countNodes[name] = value;
  }
  const bar = element("div", { class: "bar", "aria-hidden": "true" });
  const barParts = {};
  for (const state of ["done", "failed", "orphaned", "processing"]) {
    barParts[state] = element("div", { style: `background: var(--${state}); width: 0` });
    bar.append(barParts[state]);
  }
  const controls = element("div", { class: "controls" });
  const slice = [];
  for (let axis = 0; axis < dims - 2; axis++) {
    slice.push(0);
    const label = element("label");
    const name = axisName(axis, dims);
    const input = element("input", {
      type: "range", min: "0", max: String(task.grid_shape[axis] - 1), value: "0", step: "1",
      "data-axis": String(axis), "aria-label": `block grid ${name}`,
    });
    const shown = element("output", {}, `0 / ${task.grid_shape[axis] - 1}`);
    input.addEventListener("input", () => {
      slice[axis] = Number(input.value);
      shown.textContent = `${input.value} / ${task.grid_shape[axis] - 1}`;
      refreshPicture(view);
    });
    label.append(`${name}`, input, shown);
    controls.append(label);
  }
  const canvas = element("canvas",
    { class: "blocks", "data-task-id": task.task_id, width: "1", height: "1" });
  const note = element("p", { class: "plane-note" });
  const hover = element("p", { class: "hover" }, HOVER_HINT);
  const picture = element("div", { class: "picture" });
  const side = element("div");
  side.append(note, hover);
  picture.append(canvas, side);
  const failed = element("div", { class: "failed-blocks", hidden: "" });
  failed.append(element("h3", {}, "Failed blocks"), element("ul"));
  section.append(counts, bar, controls, picture, failed);
  const view = { task, dims, section, countNodes, barParts, slice, canvas, note, hover, failed,
    plane: null, request: 0, nextPictureAt: 0 };
  canvas.addEventListener("mousemove", (event) => describeCell(view, event));
  canvas.addEventListener("mouseleave", () => { hover.textContent = HOVER_HINT; });
  document.getElementById("tasks").append(section);
  return view;
}

function updateView(view, task) {
  view.task = task;
  const values = {
    done: task.skipped ? `${task.done} (${task.skipped} skipped)` : task.done,
    failed: task.failed, total: task.total, rate: task.blocks_per_second,
    eta: formatSeconds(task.eta_seconds), processing: task.processing, ready: task.ready,
    waiting: task.waiting, orphaned: task.orphaned,
    workers: task.followed ? "another run" : task.worker_processes,
  };
  for (const [name, value] of Object.entries(values)) {
    view.countNodes[name].textContent = String(value);
  }
  for (const state of ["done", "failed", "orphaned", "processing"]) {
    const share = task.total ? (100 * task[state]) / task.total : 0;
    view.barParts[state].style.width = `${share}%`;
  }
  const list = view.failed.querySelector("ul");
  list.replaceChildren();
  for (const block of task.failed_blocks) {
    const item = element("li", { "data-block-id": String(block.block_id) });
    item.append(`block ${block.block_id} at (${block.position.join(", ")}): `,
      element("span", { class: "error-line" }, block.error));
    if (block.log) {
      item.append(element("br"), element("span", { class: "log" }, `traceback in ${block.log}`));
    }
    list.append(item);
  }
  if (task.failed_blocks_not_listed) {
    const more = `… and ${task.failed_blocks_not_listed} more (see the execution summary)`;
    list.append(element("li", {}, more));
  }
  view.failed.hidden = task.failed_blocks.length === 0;
}

// ------------------------------------------------------------------ the picture
async function refreshPicture(view) {
  const request = ++view.request;
  let url = `api/blocks?task=${encodeURIComponent(view.task.task_id)}&cells=${PICTURE_CELLS}`;
  if (view.slice.length) url += `&slice=${view.slice.join(",")}`;
  const plane = await getJson(url);
  const pause = Math.max(POLL_MS, PICTURE_LOAD_FACTOR * 1000 * plane.compute_seconds);
  view.nextPictureAt = Date.now() + pause;
  if (request !== view.request) return;  // the slice moved while this was under way
  view.plane = plane;
  drawPlane(view, plane);
}

function drawPlane(view, plane) {
  const { canvas } = view;
  if (canvas.width !== plane.columns || canvas.height !== plane.rows) {
    canvas.width = plane.columns;
    canvas.height = plane.rows;
    const scale = PICTURE_PIXELS / Math.max(plane.columns, plane.rows);
    const pixelsPerCell = scale >= 1 ? Math.min(Math.floor(scale), MAX_CELL_PIXELS) : scale;
    canvas.style.width = `${plane.columns * pixelsPerCell}px`;
    // a 1D grid is one row: draw it as a band, not a hairline
    const minimum = plane.rows === 1 ? ONE_ROW_PIXELS : 0;
    canvas.style.height = `${Math.max(plane.rows * pixelsPerCell, minimum)}px`;
  }
  const context = canvas.getContext("2d");
  const image = context.createImageData(plane.columns, plane.rows);
  const palette = stateOfCode.map((state) => COLOURS[state]);
  for (let cell = 0; cell < plane.cells.length; cell++) {
    const [red, green, blue] = palette[plane.cells.charCodeAt(cell) - 48];
    const offset = 4 * cell;
    image.data[offset] = red;
    image.data[offset + 1] = green;
    image.data[offset + 2] = blue;
    image.data[offset + 3] = 255;
  }
  context.putImageData(image, 0, 0);
  const [rowAxis, columnAxis] = planeAxisNames(view.dims);
  const where = view.slice.map((k, axis) => `${axisName(axis, view.dims)} = ${k}`).join(", ");
  const shape = view.dims === 1 ? `${plane.plane_shape[1]} blocks`
    : `${rowAxis} × ${columnAxis} = ${plane.plane_shape[0]} × ${plane.plane_shape[1]} blocks`;
  const blocksPerCell = view.dims === 1 ? `${plane.step}` : `${plane.step} × ${plane.step}`;
  const cell = plane.step === 1 ? "one block per cell"
    : `each cell shows the most pressing state of ${blocksPerCell} blocks`;
  const counts = STATES.filter((state) => plane.counts[state])
    .map((state) => `${plane.counts[state]} ${state}`);
  const prefix = where ? `${where}: ` : "";
  view.note.textContent = `${prefix}${shape}; ${cell}. In this plane: ${counts.join(", ")}.`;
  view.canvas.dataset.step = String(plane.step);
}

function describeCell(view, event) {
  const plane = view.plane;
  if (!plane) return;
  const box = view.canvas.getBoundingClientRect();
  const column = Math.floor(((event.clientX - box.left) / box.width) * plane.columns);
  const row = Math.floor(((event.clientY - box.top) / box.height) * plane.rows);
  if (row < 0 || column < 0 || row >= plane.rows || column >= plane.columns) return;
  const state = stateOfCode[plane.cells.charCodeAt(row * plane.columns + column) - 48];
  const range = (index, extent) => {
    const first = index * plane.step;
    const last = Math.min(first + plane.step, extent) - 1;
    return first === last ? `${first}` : `${first}–${last}`;
  };
  const [rowAxis, columnAxis] = planeAxisNames(view.dims);
  const parts = view.slice.map((k, axis) => `${axisName(axis, view.dims)} ${k}`);
  if (view.dims > 1) parts.push(`${rowAxis} ${range(row, plane.plane_shape[0])}`);
  parts.push(`${columnAxis} ${range(column, plane.plane_shape[1])}`);
  const what = plane.step === 1 ? "block" : "blocks";
  view.hover.textContent = `${what} at ${parts.join(", ")}: ${state}`;
}

// ------------------------------------------------------------------ workers and polling
function updateWorkers(workers) {
  const body = document.querySelector("#workers tbody");
  body.replaceChildren();
  for (const worker of workers) {
    const row = element("tr", { "data-worker-id": String(worker.worker_id) });
    row.append(element("td", {}, String(worker.worker_id)), element("td", {}, worker.task_id),
      element("td", {}, worker.address), element("td", {}, worker.blocks.join(", ") || "–"),
      element("td", { class: "log" }, worker.log || "–"));
    body.append(row);
  }
  document.getElementById("no-workers").hidden = workers.length > 0;
}

function setStatus(text, stale) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.classList.toggle("stale", stale);
}

async function poll() {
  let delay = POLL_MS;
  try {
    const run = await getJson("api/run");
    stateOfCode = run.states;
    for (const task of run.tasks) {
      if (!views.has(task.task_id)) views.set(task.task_id, createView(task));
      updateView(views.get(task.task_id), task);
    }
    updateWorkers(run.workers);
    const due = run.tasks.map((task) => views.get(task.task_id))
      .filter((view) => Date.now() + POLL_MS / 2 >= view.nextPictureAt);
    await Promise.all(due.map(refreshPicture));
    const updated = new Date().toLocaleTimeString();
    setStatus(`running for ${formatSeconds(run.elapsed_seconds)}; updated ${updated}`, false);
  } catch (error) {
    setStatus(`no answer from the run (${error.message}); it may have ended. Trying again…`,
      true);
    delay = RETRY_MS;
  }
  setTimeout(poll, delay);
}

// the page's answer set the cookie its requests carry: the run's token leaves the
// address bar, the history and whatever is copied from them
if (new URLSearchParams(location.search).has("token")) {
  history.replaceState(null, "", location.pathname);
}
readColours();
buildLegend();
poll();
