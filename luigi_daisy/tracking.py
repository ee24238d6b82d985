"""A run's live block map over HTTP, on the run's tracking URL (luigid links to it).

Routes:

``/``
    The page (``web/blockmap.html`` with its CSS and JavaScript under ``/static/``):
    plain files, no build step, nothing fetched from elsewhere. It polls the two JSON
    routes below and redraws without reloading.
``/api/run``
    Per task: done / failed / total, rate, ETA, the failed blocks with the last line of
    their error and the worker log that holds the rest; the workers connected.
``/api/blocks?task=ID[&slice=K0,K1,...][&cells=N]``
    The state of each block of one plane of a task's block grid: the last two grid
    axes, at coordinate ``K0, K1, ...`` of each axis before them (3D and 4D grids need
    one and two). ``cells`` bounds the picture's side (default 256, at most 1024): a
    larger plane is coarsened, each cell then summarising ``step`` x ``step`` blocks.
    The work and the answer are proportional to the plane, never to the whole grid;
    ``compute_seconds`` says how long the answer took, and the page waits at least
    :data:`PICTURE_LOAD_FACTOR` times that before it asks for the plane again.
    Bad parameters are answered 400 and an unknown task 404, with ``{"error": ...}``.
``/state.json``
    The counters of :func:`run_state`, for scripts.

Access: every request proves the run's secret (:attr:`TrackingPage.token`, made for
this run alone and unrelated to the block server's): the URL the run prints and sends
to luigid carries it as ``?token=...``; opening the page with it sets a cookie
(HttpOnly, SameSite=Strict) that the page's own requests carry, and the page then drops
the token from the address bar. A request with neither is answered 403, and so is one
whose ``Host`` header names another machine than this one (DNS rebinding). Only GET,
without a body; at most :data:`MAX_CONNECTIONS` connections, each closed after
:data:`IDLE_CONNECTION_SECONDS` of silence.
"""

from __future__ import annotations

import hmac
import ipaddress
import itertools
import json
import secrets
import socket
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream
from tornado.netutil import bind_sockets

from .block_states import STATE_NAMES, coarsen, encode_cells, state_counts
from .blocks import new_block
from .errors import ConfigError
from .listening import is_loopback
from .summary import error_line

if TYPE_CHECKING:  # pragma: no cover
    from .run import WorkerRun

WEB_FOLDER = Path(__file__).resolve().parent / "web"
#: the picture's side, in cells, when the page does not say
DEFAULT_CELLS = 256
#: the largest side a page may ask for
MAX_CELLS = 1024
#: failed blocks listed per task, the first to fail (the summary at the end lists more)
MAX_LISTED_FAILURES = 50
#: the rate is measured over about this many seconds
RATE_WINDOW = 20.0
#: the page waits this many times an answer's ``compute_seconds`` before asking again
#: for the same picture (the copy in ``web/blockmap.js`` must agree)
PICTURE_LOAD_FACTOR = 20
#: connections served at once; one more is closed as soon as it is accepted (a page
#: uses a few; the run's file descriptors stay for its workers)
MAX_CONNECTIONS = 64
#: seconds a connection may stay silent, before its first request or between two,
#: and may take to send a request's headers, before it is closed
IDLE_CONNECTION_SECONDS = 10.0
#: bytes of a request's headers (browsers send every cookie of the host, any port)
MAX_HEADER_BYTES = 64 * 1024
#: bytes of a request's body: GET only, with no body
MAX_BODY_BYTES = 0
#: the query parameter that carries the run's secret
TOKEN_PARAMETER = "token"
#: host names that always mean this machine in a ``Host`` header
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost",
                            "ip6-loopback"})


def displayed_block_id(run: WorkerRun, task_id: str, index: int):
    """The id users know a block by (``block.block_id[1]``, daisy's number): the page
    shows this and nothing else wherever it names a block."""
    return new_block(task_id, index, run.tasks[task_id].grid).block_id[1]


def run_state(run: WorkerRun) -> dict:
    """Plain-data snapshot of a run: per task counters, rate and who runs it."""
    elapsed = max(time.monotonic() - run.started_at, 1e-9)
    tasks = {}
    for task_id, state in run.scheduler.task_states.items():
        processed = state.completed_count - state.skipped_count + state.failed_count
        tasks[task_id] = {
            "total": state.total_block_count,
            "completed": state.completed_count,
            "skipped": state.skipped_count,
            "failed": state.failed_count,
            "orphaned": state.orphaned_count,
            "processing": state.processing_count,
            "ready": state.ready_count,
            "pending": state.pending_count,
            "blocks_per_second": round(processed / elapsed, 2),
            "workers": run.workers_of(task_id),
            "followed": task_id in run.followed,
        }
    return {"elapsed_seconds": round(elapsed, 3), "tasks": tasks}


class RateMeter:
    """Blocks processed per second per task, over the last :data:`RATE_WINDOW` seconds."""

    def __init__(self, started_at: float) -> None:
        self.started_at = started_at
        self.samples: dict[str, deque[tuple[float, int]]] = {}

    def rate(self, task_id: str, processed: int, now: float) -> float:
        """Record ``processed`` at ``now`` and return the recent rate."""
        samples = self.samples.setdefault(task_id, deque())
        if not samples or now - samples[-1][0] >= 0.5:
            samples.append((now, processed))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:
            samples.popleft()
        first_time, first_processed = samples[0]
        if now - first_time >= 2.0:
            return (processed - first_processed) / (now - first_time)
        return processed / max(now - self.started_at, 1e-9)


def _worker_log(run: WorkerRun, worker_id: int | None) -> str | None:
    paths = run.log_files.get(worker_id) if worker_id is not None else None
    return paths[1] if paths else None


def _task_report(run: WorkerRun, task_id: str, rates: RateMeter, now: float) -> dict:
    state = run.scheduler.task_states[task_id]
    grid = run.tasks[task_id].grid
    processed = state.completed_count - state.skipped_count + state.failed_count
    rate = rates.rate(task_id, processed, now)
    remaining = (state.total_block_count - state.completed_count - state.failed_count
                 - state.orphaned_count)
    if remaining <= 0:
        eta = 0.0
    elif rate > 0 and task_id not in run.followed:
        eta = round(remaining / rate, 1)
    else:
        eta = None
    failed_by = run.server.failed_by if run.server is not None else {}
    failed_blocks = [
        {"block_id": number,
         "position": list(grid.position_of(grid.index_of_number(number))),
         "error": error_line(error),
         "log": _worker_log(run, failed_by.get((task_id, number)))}
        for number, error in itertools.islice(state.failed_blocks.items(), MAX_LISTED_FAILURES)]
    return {
        "task_id": task_id,
        "total": state.total_block_count,
        "done": state.completed_count,
        "skipped": state.skipped_count,
        "failed": state.failed_count,
        "orphaned": state.orphaned_count,
        "processing": state.processing_count,
        "ready": state.ready_count,
        "waiting": state.pending_count,
        "blocks_per_second": round(rate, 2),
        "eta_seconds": eta,
        "grid_shape": list(grid.grid_shape),
        "followed": task_id in run.followed,
        "worker_processes": run.workers_of(task_id),
        "failed_blocks": failed_blocks,
        "failed_blocks_not_listed": max(0, len(state.failed_blocks) - MAX_LISTED_FAILURES),
    }


def run_report(run: WorkerRun, rates: RateMeter) -> dict:
    """What the page shows besides the pictures: every task, and the workers connected."""
    now = time.monotonic()
    workers = []
    if run.server is not None:
        for connection in run.server.connections:
            if connection.task_id is None or connection.closed:
                continue  # not authenticated (yet)
            held = run.server.handout.held_keys(connection)
            # a pool worker serves the tasks of the blocks it holds; an idle one, its pool
            serving = list(dict.fromkeys(task_id for task_id, _ in held))
            workers.append({
                "worker_id": connection.worker_id,
                "task_id": ", ".join(serving) or connection.task_id,
                "pool": connection.task_id if connection.task_id not in run.tasks else None,
                "address": ":".join(map(str, connection.address))
                if isinstance(connection.address, tuple) else str(connection.address),
                "blocks": sorted(displayed_block_id(run, task_id, index)
                                 for task_id, index in held),
                "log": _worker_log(run, connection.worker_id),
            })
    workers.sort(key=lambda worker: (worker["task_id"], worker["worker_id"] or 0))
    return {
        "elapsed_seconds": round(now - run.started_at, 1),
        "states": list(STATE_NAMES),
        "tasks": [_task_report(run, task_id, rates, now) for task_id in run.tasks],
        "workers": workers,
    }


class BadQuery(tornado.web.HTTPError):
    """A request the block map cannot answer; the message says what to change."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(status_code, reason="Bad Request" if status_code == 400 else None)
        self.message = message


def _integers(name: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",")) if text else ()
    except ValueError:
        raise BadQuery(400, f"query parameter {name}={text!r} must be integers separated "
                            f"by commas") from None


def block_plane_report(run: WorkerRun, task_id: str | None, slice_text: str | None,
                       cells_text: str | None) -> dict:
    """The answer of ``/api/blocks``; raises :class:`BadQuery` on bad parameters."""
    if not task_id:
        raise BadQuery(400, "query parameter task is missing; give the id of a task of "
                            "this run, e.g. /api/blocks?task=" + next(iter(run.tasks), ""))
    if task_id not in run.tasks:
        raise BadQuery(404, f"unknown task {task_id!r}; this run has "
                            f"{', '.join(map(repr, run.tasks))}")
    grid = run.tasks[task_id].grid
    leading_axes = max(grid.dims - 2, 0)
    leading = _integers("slice", slice_text or "")
    if not leading and slice_text is None and leading_axes:
        leading = (0,) * leading_axes
    if len(leading) != leading_axes:
        raise BadQuery(400, f"query parameter slice={slice_text!r} must give {leading_axes} "
                            f"coordinates for task {task_id!r}, whose block grid has shape "
                            f"{list(grid.grid_shape)} (one for each axis before the last two)")
    for axis, (k, extent) in enumerate(zip(leading, grid.grid_shape)):
        if not 0 <= k < extent:
            raise BadQuery(400, f"query parameter slice={slice_text!r}: coordinate {k} of "
                                f"axis {axis} is outside 0..{extent - 1} for task "
                                f"{task_id!r} (block grid shape {list(grid.grid_shape)})")
    cells = DEFAULT_CELLS
    if cells_text is not None:
        values = _integers("cells", cells_text)
        cells = values[0] if len(values) == 1 else 0
        if not 1 <= cells <= MAX_CELLS:
            raise BadQuery(400, f"query parameter cells={cells_text!r} must be an integer "
                                f"from 1 to {MAX_CELLS} (cells along the picture's longer side)")
    started = time.perf_counter()
    plane = run.scheduler.block_plane(task_id, leading)
    step = max(1, -(-max(plane.shape) // cells))
    picture = coarsen(plane, step)
    counts = state_counts(plane)
    cells_text = encode_cells(picture)
    return {
        "task_id": task_id,
        "grid_shape": list(grid.grid_shape),
        "slice": list(leading),
        "plane_shape": list(plane.shape),
        "step": step,
        "rows": int(picture.shape[0]),
        "columns": int(picture.shape[1]),
        "counts": counts,
        "cells": cells_text,
        # the page asks for large planes less often, so the run's event loop, which
        # also serves the workers, spends at most a few percent of its time on them
        "compute_seconds": round(time.perf_counter() - started, 4),
    }


class _Guarded:
    """What every route of the block map does first: GET only, the ``Host`` header
    names this machine, and the request proves the run's secret."""

    SUPPORTED_METHODS = ("GET",)
    page: TrackingPage

    def prepare(self) -> None:
        self.page.check_access(self)  # type: ignore[arg-type]

    def set_default_headers(self) -> None:
        handler: tornado.web.RequestHandler = self  # type: ignore[assignment]
        # the page's URL may carry the token: never tell another site where it came from
        handler.set_header("Referrer-Policy", "no-referrer")
        handler.set_header("Content-Security-Policy", "frame-ancestors 'none'")
        handler.set_header("X-Content-Type-Options", "nosniff")

    def write_error(self, status_code: int, **kwargs) -> None:
        handler: tornado.web.RequestHandler = self  # type: ignore[assignment]
        error = kwargs.get("exc_info", (None, None))[1]
        message = error.message if isinstance(error, BadQuery) else handler._reason
        handler.set_header("Content-Type", "application/json")
        handler.set_header("Cache-Control", "no-store")
        handler.write(json.dumps({"error": message}, separators=(",", ":")))


class _Handler(_Guarded, tornado.web.RequestHandler):
    def initialize(self, page: TrackingPage) -> None:
        self.page = page

    def write_json(self, data: dict) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(data, separators=(",", ":")))


class _PageHandler(_Handler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.write((WEB_FOLDER / "blockmap.html").read_bytes())


class _RunHandler(_Handler):
    def get(self) -> None:
        self.write_json(run_report(self.page.run, self.page.rates))


class _BlocksHandler(_Handler):
    def get(self) -> None:
        self.write_json(block_plane_report(
            self.page.run, self.get_query_argument("task", None),
            self.get_query_argument("slice", None), self.get_query_argument("cells", None)))


class _StateHandler(_Handler):
    def get(self) -> None:
        self.write_json(run_state(self.page.run))


class _NotFoundHandler(_Handler):
    def get(self) -> None:
        raise BadQuery(404, f"no such page: {self.request.path[:100]!r}")


class _StaticHandler(_Guarded, tornado.web.StaticFileHandler):
    def initialize(self, path: str, page: TrackingPage) -> None:  # type: ignore[override]
        super().initialize(path)
        self.page = page


class _BoundedHTTPServer(HTTPServer):
    """An HTTP server that closes a connection beyond :data:`MAX_CONNECTIONS` at once."""

    def handle_stream(self, stream: IOStream, address: tuple) -> None:
        if len(self._connections) >= MAX_CONNECTIONS:
            stream.close()
            return
        super().handle_stream(stream, address)


def _host_name(host: str) -> str:
    """``host`` without brackets or a trailing dot, lower case."""
    return host.strip("[]").rstrip(".").lower()


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


class TrackingPage:
    """Serves a run's live block map while it runs.

    The run's scheduler must keep block states (``BlockScheduler(block_map=True)``).
    :attr:`token` is this run's secret for the page; :attr:`url` (after :meth:`start`)
    carries it.
    """

    def __init__(self, run: WorkerRun) -> None:
        self.run = run
        self.rates: RateMeter | None = None
        self.url: str | None = None
        self.token = secrets.token_urlsafe(32)
        self.cookie_name = "luigi_daisy_block_map"
        self.allowed_hosts: frozenset[str] = frozenset()
        self._bound_wildcard = False
        self._server: HTTPServer | None = None

    def application(self) -> tornado.web.Application:
        """The tornado application behind the page."""
        arguments = {"page": self}
        return tornado.web.Application([
            (r"/", _PageHandler, arguments),
            (r"/api/run", _RunHandler, arguments),
            (r"/api/blocks", _BlocksHandler, arguments),
            (r"/state.json", _StateHandler, arguments),
            (r"/static/(blockmap\.(?:css|js))", _StaticHandler,
             {"path": str(WEB_FOLDER), "page": self}),
        ], compress_response=True, default_handler_class=_NotFoundHandler,
            default_handler_args=arguments)

    def start(self, host: str = "127.0.0.1", advertise_host: str | None = None) -> str:
        """Listen on a free port of ``host`` and return the page's URL, which carries
        the token. Its host is ``host``, or, when ``host`` is every interface
        (``0.0.0.0``, ``::``), ``advertise_host`` (this machine's name when that is
        None or loopback). Raises :class:`~luigi_daisy.errors.ConfigError` when
        ``host`` is not an address of this machine."""
        self.rates = RateMeter(self.run.started_at)
        self._server = _BoundedHTTPServer(
            self.application(), idle_connection_timeout=IDLE_CONNECTION_SECONDS,
            body_timeout=IDLE_CONNECTION_SECONDS, max_header_size=MAX_HEADER_BYTES,
            max_body_size=MAX_BODY_BYTES, max_buffer_size=16 * MAX_HEADER_BYTES)
        try:
            sockets = bind_sockets(0, address=host or None)
        except OSError as error:
            raise ConfigError(
                f"block_map_host={host!r}: the block map cannot listen there ({error}); "
                f"give an address of this machine: 127.0.0.1 (the default, this machine "
                f"only) or 0.0.0.0 (every interface)") from error
        self._server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        # cookies are shared by every port of a host: one per run
        self.cookie_name = f"luigi_daisy_block_map_{port}"
        self._bound_wildcard = _is_wildcard(host)
        if self._bound_wildcard:
            shown = advertise_host or ""
            if not shown or is_loopback(shown) or _is_wildcard(shown):
                shown = socket.gethostname()
        else:
            shown = host
        names = {_host_name(name) for name in (shown, host, advertise_host or "")
                 if name and not _is_wildcard(name)}
        if self._bound_wildcard:
            names.update(_host_name(name) for name in (socket.gethostname(), socket.getfqdn()))
        self.allowed_hosts = frozenset(names | LOOPBACK_NAMES)
        shown_host = f"[{shown}]" if ":" in shown else shown
        self.url = f"http://{shown_host}:{port}/?{TOKEN_PARAMETER}={self.token}"
        return self.url

    def host_allowed(self, host_name: str) -> bool:
        """Whether a request whose ``Host`` header names ``host_name`` is served: this
        machine's names (loopback, the advertised and bound ones) and, on loopback or
        every interface, IP addresses (a name that is none of these may be an
        attacker's, rebound to this machine)."""
        name = _host_name(host_name)
        if name in self.allowed_hosts:
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False
        return address.is_loopback or self._bound_wildcard

    def token_matches(self, value: str | None) -> bool:
        """Whether ``value`` is this run's token (compared in constant time)."""
        return value is not None and hmac.compare_digest(value.encode(), self.token.encode())

    def check_access(self, handler: tornado.web.RequestHandler) -> None:
        """Answer 403 unless the request's ``Host`` names this machine and it carries
        the token (query or cookie); the page opened with the token sets the cookie."""
        if not self.host_allowed(handler.request.host_name):
            raise BadQuery(403, f"the block map does not answer for the host "
                                f"{handler.request.host[:100]!r}; open the URL the run "
                                f"printed")
        if self.token_matches(handler.get_query_argument(TOKEN_PARAMETER, None)):
            if handler.request.path == "/":
                handler.set_cookie(self.cookie_name, self.token, path="/", httponly=True,
                                   samesite="Strict")
            return
        if self.token_matches(handler.get_cookie(self.cookie_name)):
            return
        raise BadQuery(403, "this run's block map needs its token: open the URL the run "
                            "printed (and sent to luigid), which ends with ?token=...")

    def sockets(self) -> list:
        """The page's listening sockets (a forked worker closes them)."""
        return list(self._server._sockets.values()) if self._server is not None else []

    def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.stop()
