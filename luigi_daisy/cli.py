"""The ``luigi-daisy`` command: the user's handle on the records of done blocks.

PATH is one record, or a folder: the records in it, in its ``.luigi_daisy`` folders and
in those of the zarr arrays and folders below it (where ``BlockwiseTask`` keeps them,
with the data), so ``luigi-daisy status OUTPUT_FOLDER`` shows a whole pipeline.

- ``status PATH [--failed]``: each task's id, geometry and done / failed / total counts,
  and its failed blocks (daisy's block id, write ROI, the last line of the error and
  the worker log that holds the rest; ``--failed`` lists them all). Reads records
  that a run is writing. Exits 1 when a task there is incomplete.
- ``reset PATH --roi R [--task T] [--downstream]``: marks the blocks whose write ROI
  intersects R not done (and forgets their failures); with ``--downstream`` also the
  blocks of the tasks downstream (in PATH) that read them, and so on.
- ``skip PATH --roi R [--task T]``: records those blocks as done without running them.
- ``rerun-block PATH BLOCK_ID [--task T] [--pdb]``: runs one block of a
  ``BlockwiseTask`` in this process (its ``setup_worker``, then ``process_block``),
  rebuilt from the record; records it done when it succeeds.

A user error (no record there, a malformed ROI, an unknown task or block) is one line
on stderr and exit code 2; a block that fails again in ``rerun-block`` exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import os
import re
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

from funlib.geometry import Roi

from .blocks import BlockGrid, daisy_block_id, new_block
from .claims import TaskLock, lock_path
from .errors import CommandError, GeometryError, LuigiDaisyError
from .ledger import SUFFIX, Ledger, LedgerError, find_ledgers, is_ledger, read_ledger_summary
from .summary import MAX_LISTED_FAILURES, error_line, split_log

EXIT_INCOMPLETE = 1
EXIT_UNREADABLE = 2
#: a block that failed again (``rerun-block``)
EXIT_FAILED = 1
#: bad input to a command
EXIT_USAGE = 2

#: the folder, inside or next to a task's output, that holds its record
RECORD_FOLDER = ".luigi_daisy"
#: how deep below PATH records are looked for
MAX_DEPTH = 8
ROI_FORM = "'[0:512, 0:256, 0:512]' (begin:end per dimension, in world units)"


# --------------------------------------------------------------------------- records
def _is_zarr_array(folder: str) -> bool:
    """Whether ``folder`` is a zarr array (whose chunks are not searched for records)."""
    if os.path.exists(os.path.join(folder, ".zarray")):
        return True
    try:
        with open(os.path.join(folder, "zarr.json"), "rb") as file:
            return json.load(file).get("node_type") == "array"
    except (OSError, ValueError, AttributeError):
        return False


def find_records(path: Path) -> list[Path]:
    """The records under ``path`` (``[path]`` when it is one), sorted: those in it, and
    in every ``.luigi_daisy`` folder below it, without looking into zarr arrays' chunks
    or other hidden folders."""
    if is_ledger(path):
        return [path]
    found: set[Path] = set()

    def visit(folder: Path, depth: int) -> None:
        found.update(find_ledgers(folder))
        if depth >= MAX_DEPTH:
            return
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:
            return
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=False) or is_ledger(entry.path):
                    continue
            except OSError:
                continue
            if entry.name == RECORD_FOLDER:
                found.update(find_ledgers(entry.path))
            elif _is_zarr_array(entry.path):
                inside = Path(entry.path) / RECORD_FOLDER
                if inside.is_dir():
                    found.update(find_ledgers(inside))
            elif not entry.name.startswith("."):
                visit(Path(entry.path), depth + 1)

    if path.is_dir():
        visit(path, 0)
    return sorted(found)


def _summaries(path: Path) -> list[dict]:
    """The readable records under ``path``; a user error when there is none."""
    if not path.exists():
        raise CommandError(f"{path} does not exist; give a record (*{SUFFIX}) or a folder "
                           f"that holds records")
    summaries = []
    for record in find_records(path):
        try:
            summaries.append(read_ledger_summary(record))
        except LedgerError as error:
            print(f"luigi-daisy: warning: {error}", file=sys.stderr)
    if not summaries:
        raise CommandError(f"no record of done blocks (*{SUFFIX}) in {path} or the "
                           f"{RECORD_FOLDER} folders below it; give the output folder of "
                           f"a run, or a record")
    return summaries


def _pick(summaries: list[dict], task: str | None, path: Path) -> dict:
    """The record of ``task`` (the only one when None)."""
    listing = "; ".join(f"{summary['task_id']} ({summary['path']})" for summary in summaries)
    if task is None:
        if len(summaries) == 1:
            return summaries[0]
        raise CommandError(f"{path} holds {len(summaries)} records; choose one with --task "
                           f"TASK_ID: {listing}")
    chosen = [summary for summary in summaries if summary["task_id"] == task]
    if len(chosen) > 1:
        raise CommandError(f"task {task} has {len(chosen)} records under {path} "
                           f"({', '.join(summary['path'] for summary in chosen)}); give "
                           f"the one to use as PATH")
    if not chosen:
        raise CommandError(f"no record of task {task} in {path}; it holds: {listing}")
    return chosen[0]


def _grid_of(geometry: dict, task_id: str = "task") -> BlockGrid | None:
    try:
        rois = [Roi(*geometry[name]) for name in ("total_roi", "read_roi", "write_roi")]
        return BlockGrid(*rois, fit=geometry["fit"], name=task_id)
    except (KeyError, TypeError, ValueError, GeometryError):
        return None


def _grid(summary: dict) -> BlockGrid:
    grid = _grid_of(summary["geometry"], summary["task_id"])
    if grid is None:
        raise CommandError(f"record {summary['path']} of task {summary['task_id']} holds no "
                           f"usable geometry; it was written by another tool or is damaged")
    return grid


@contextlib.contextmanager
def _writing(summary: dict) -> Iterator[Ledger]:
    """The record of ``summary`` opened for writing, while no run holds its task."""
    path = Path(summary["path"])
    lock = TaskLock(lock_path(path))
    if not lock.try_acquire():
        raise CommandError(f"task {summary['task_id']} is being run by another process (it "
                           f"holds {lock.path}); wait until that run ends, or stop it")
    try:
        ledger = Ledger(path, summary["task_id"], summary["geometry"])
        try:
            yield ledger
        finally:
            ledger.close()
    finally:
        lock.release()


# --------------------------------------------------------------------------- ROIs
_SLICE = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")
_FUNLIB_ROI = re.compile(r"^(\[[^\]]*\])\s*\(([-\d,\s]*)\)$")


def parse_roi(text: str) -> tuple[tuple[int, int], ...]:
    """``'[0:512, 0:256]'`` as ``((0, 512), (0, 256))``: half-open intervals in world
    units, one per dimension (funlib's way of printing a Roi, with its shape after it,
    is read too).

    Raises
    ------
    CommandError
        When ``text`` is not of that form; the message shows the form expected.
    """
    stripped = text.strip()
    shape = None
    funlib = _FUNLIB_ROI.match(stripped)
    if funlib is not None:  # as funlib prints a Roi: '[0:10, 0:10] (10, 10)'
        stripped, shape = funlib.group(1), funlib.group(2)
    if not (stripped.startswith("[") and stripped.endswith("]")) or len(stripped) < 3:
        raise CommandError(f"--roi {text!r} is not a ROI; write it as {ROI_FORM}")
    intervals = []
    for part in stripped[1:-1].split(","):
        match = _SLICE.match(part)
        if match is None:
            raise CommandError(f"--roi {text!r}: {part.strip()!r} is not begin:end; write "
                               f"the ROI as {ROI_FORM}")
        begin, end = int(match.group(1)), int(match.group(2))
        if end <= begin:
            raise CommandError(f"--roi {text!r}: {part.strip()} is empty (end <= begin); "
                               f"write the ROI as {ROI_FORM}")
        intervals.append((begin, end))
    if shape is not None:
        extents = tuple(int(extent) for extent in shape.replace(",", " ").split())
        if extents != tuple(end - begin for begin, end in intervals):
            raise CommandError(f"--roi {text!r}: the shape {shape} does not match the "
                               f"slices; write the ROI as {ROI_FORM}")
    return tuple(intervals)


def _format_box(box: tuple[tuple[int, int], ...]) -> str:
    return "[" + ", ".join(f"{begin}:{end}" for begin, end in box) + "]"


def _positions_per_dim(grid: BlockGrid, box: tuple[tuple[int, int], ...],
                       read: bool) -> list[range]:
    """Per dimension, the grid positions whose write (or read) interval meets ``box``."""
    interval = grid.read_interval if read else grid.write_interval
    ranges = []
    for dim, (low, high) in enumerate(box):
        hits = [k for k in range(grid.grid_shape[dim])
                if interval(dim, k)[0] < high and interval(dim, k)[1] > low]
        ranges.append(range(hits[0], hits[-1] + 1) if hits else range(0))
    return ranges


def blocks_in(grid: BlockGrid, box: tuple[tuple[int, int], ...], read: bool = False,
              ) -> tuple[list[int], tuple[tuple[int, int], ...] | None]:
    """Indices of the blocks whose write ROI (read ROI, ``read``) meets ``box``, and the
    box their write ROIs cover together (None when there are none)."""
    ranges = _positions_per_dim(grid, box, read)
    if any(len(span) == 0 for span in ranges):
        return [], None
    indices = [grid.index_of(position) for position in itertools.product(*ranges)]
    covered = tuple((grid.write_interval(dim, span[0])[0], grid.write_interval(dim, span[-1])[1])
                    for dim, span in enumerate(ranges))
    return indices, covered


def _check_dims(box: tuple[tuple[int, int], ...], grid: BlockGrid, task_id: str) -> None:
    if len(box) != grid.dims:
        raise CommandError(f"--roi {_format_box(box)} has {len(box)} dimensions, but task "
                           f"{task_id} has {grid.dims}; write the ROI as {ROI_FORM}")


# --------------------------------------------------------------------------- commands
def _format_roi(roi: list | None) -> str:
    if not roi or len(roi) != 2:
        return "(not recorded)"
    begin, shape = roi
    return f"offset {tuple(begin)} shape {tuple(shape)}"


def _print_failed(summary: dict, show_all: bool) -> None:
    grid = _grid_of(summary["geometry"], summary["task_id"])
    with Ledger(summary["path"], summary["task_id"], summary["geometry"],
                read_only=True) as ledger:
        failed = ledger.failed_blocks()
    listed = failed if show_all else failed[:MAX_LISTED_FAILURES]
    print("  failed blocks (daisy block id, write roi: last error line; log):")
    for index, text in listed:
        error, log = split_log(text)
        where = f"\n      log: {log}" if log else ""
        if grid is None:
            print(f"    block index {index}: {error_line(error)}{where}")
            continue
        write_roi = grid.rois_of(index)[1]
        print(f"    block {daisy_block_id(grid, index)} (write roi {write_roi}): "
              f"{error_line(error)}{where}")
    if len(failed) > len(listed):
        print(f"    ... and {len(failed) - len(listed)} more (--failed lists them all)")


def status(path: Path, show_failed: bool = False) -> int:
    """Print the state of every record under ``path``; return the exit code."""
    records = find_records(path) if path.exists() else []
    if not records:
        print(f"luigi-daisy: error: no record of done blocks (*{SUFFIX}) in {path} or the "
              f"{RECORD_FOLDER} folders below it", file=sys.stderr)
        return EXIT_UNREADABLE
    exit_code = 0
    for record in records:
        try:
            summary = read_ledger_summary(record)
        except LedgerError as error:
            print(f"luigi-daisy: error: {error}", file=sys.stderr)
            exit_code = EXIT_UNREADABLE
            continue
        geometry = summary["geometry"]
        total = summary["total"]
        complete = total is not None and summary["done"] >= total
        print(f"task {summary['task_id']}: {'complete' if complete else 'INCOMPLETE'}")
        print(f"  ledger     : {summary['path']}")
        print(f"  total roi  : {_format_roi(geometry.get('total_roi'))}")
        print(f"  read roi   : {_format_roi(geometry.get('read_roi'))}")
        print(f"  write roi  : {_format_roi(geometry.get('write_roi'))}")
        print(f"  fit        : {geometry.get('fit', '(not recorded)')}")
        print(f"  blocks     : {summary['done']} done, {summary['failed']} failed, "
              f"{total} total")
        if summary["failed"]:
            try:
                _print_failed(summary, show_failed)
            except LedgerError as error:
                print(f"luigi-daisy: error: {error}", file=sys.stderr)
                exit_code = EXIT_UNREADABLE
        if not complete and exit_code == 0:
            exit_code = EXIT_INCOMPLETE
    return exit_code


def _downstream_of(summaries: list[dict], task_id: str) -> list[dict]:
    """The records whose task reads ``task_id`` (its id among their origin's upstream)."""
    return [summary for summary in summaries
            if task_id in ((summary.get("origin") or {}).get("upstream") or {})]


def reset(path: Path, roi: str, task: str | None, downstream: bool) -> int:
    """Mark the blocks of a region not done (``luigi-daisy reset``)."""
    box = parse_roi(roi)
    summaries = _summaries(path)
    chosen = _pick(summaries, task, path)
    grid = _grid(chosen)
    _check_dims(box, grid, chosen["task_id"])
    if downstream and is_ledger(path):
        raise CommandError(f"--downstream needs the folder that holds the downstream "
                           f"tasks' records too (the run's output folder), not the one "
                           f"record {path}")
    # (summary, box its blocks must meet, whether their read ROI counts)
    queue = [(chosen, box, False)]
    reset_counts: dict[str, int] = {}
    seen: set[tuple[str, tuple]] = set()
    while queue:
        summary, region, read = queue.pop(0)
        if (summary["task_id"], region) in seen:
            continue
        seen.add((summary["task_id"], region))
        grid = _grid(summary)
        if len(region) != grid.dims:
            continue  # a task of other dimensions cannot read this region
        indices, covered = blocks_in(grid, region, read=read)
        with _writing(summary) as ledger:
            count = ledger.forget_done(indices)
        reset_counts[summary["task_id"]] = reset_counts.get(summary["task_id"], 0) + count
        if downstream and covered is not None:
            queue.extend((other, covered, True)
                         for other in _downstream_of(summaries, summary["task_id"]))
    for task_id, count in reset_counts.items():
        print(f"reset {count} blocks of task {task_id}")
    return 0


def skip(path: Path, roi: str, task: str | None) -> int:
    """Record the blocks of a region as done without running them (``luigi-daisy
    skip``)."""
    box = parse_roi(roi)
    chosen = _pick(_summaries(path), task, path)
    grid = _grid(chosen)
    _check_dims(box, grid, chosen["task_id"])
    indices, _ = blocks_in(grid, box)
    with _writing(chosen) as ledger:
        before = ledger.done_count()
        ledger.record_done_many(indices)
        ledger.flush()
        added = ledger.done_count() - before
    print(f"recorded {added} blocks of task {chosen['task_id']} as done without running "
          f"them ({len(indices) - added} of the {len(indices)} in the ROI were done already)")
    return 0


def _rebuild(summary: dict):
    """The ``BlockwiseTask`` of a record, rebuilt from its origin."""
    import luigi.task_register

    origin = summary.get("origin") or {}
    task_id = summary["task_id"]
    if origin.get("kind") != "luigi":
        raise CommandError(f"record {summary['path']} of task {task_id} does not say how to "
                           f"rebuild its task (only BlockwiseTask runs record it); "
                           f"rerun-block runs blocks of BlockwiseTasks only")
    module, family = origin.get("module"), origin.get("family")
    if module == "__main__":
        raise CommandError(f"task {task_id} was defined in the script that ran it "
                           f"(__main__): move {family} into a module to rerun its blocks")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `luigi --module` finds modules here
    try:
        importlib.import_module(module)
        task_class = luigi.task_register.Register.get_task_cls(family)
    except ImportError as error:
        raise CommandError(f"cannot import module {module} of task {task_id} ({error}); "
                           f"run from where the run ran, or set PYTHONPATH") from None
    except luigi.task_register.TaskClassException as error:
        raise CommandError(f"module {module} defines no task {family} ({error})") from None
    task = task_class.from_str_params(origin.get("params") or {})
    if task.task_id != task_id:
        raise CommandError(f"the task rebuilt from record {summary['path']} has id "
                           f"{task.task_id}, not {task_id}: its parameters changed since")
    return task


def rerun_block(path: Path, block_id: str, task: str | None, post_mortem: bool) -> int:
    """Run one block in this process (``luigi-daisy rerun-block``); return the exit code."""
    summary = _pick(_summaries(path), task, path)
    grid = _grid(summary)
    task_id = summary["task_id"]
    try:
        number = int(block_id)
        index = grid.index_of_number(number)
        valid = (number >= 0 and grid.contains_position(grid.position_of(index))
                 and daisy_block_id(grid, index) == number)
    except (ValueError, ArithmeticError):
        valid = False
    if not valid:
        raise CommandError(f"{block_id} is not a block id of task {task_id} (daisy's block "
                           f"ids, as luigi-daisy status and the block map show them)")
    blockwise_task = _rebuild(summary)
    block = new_block(task_id, index, grid)
    with _writing(summary) as ledger:
        print(f"running block {number} of task {task_id} (write roi {block.write_roi}) in "
              f"this process", flush=True)
        try:
            blockwise_task.setup_worker()
            blockwise_task.process_block(block)
        except Exception:  # noqa: BLE001 - the user's code: shown, and the block stays failed
            traceback.print_exc()
            sys.stderr.flush()
            if post_mortem:
                import pdb

                pdb.post_mortem(sys.exc_info()[2])
            print(f"block {number} of task {task_id} failed again; its record is unchanged",
                  file=sys.stderr)
            return EXIT_FAILED
        ledger.forget_done([index])  # forgets its failure too
        ledger.record_done_many([index])
        ledger.flush()
    print(f"block {number} of task {task_id} succeeded; recorded as done")
    return 0


# --------------------------------------------------------------------------- entry point
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="luigi-daisy", description="Inspect and change the records of done blocks.")
    commands = parser.add_subparsers(dest="command", required=True)
    where = "a record, or a folder of records (an output folder of a run)"
    status_parser = commands.add_parser("status", help="show the done and failed blocks")
    status_parser.add_argument("path", type=Path, help=where)
    status_parser.add_argument("--failed", action="store_true",
                               help=f"list every failed block (not the first "
                                    f"{MAX_LISTED_FAILURES})")
    roi_help = f"the region, in world units: {ROI_FORM}"
    task_help = "the task whose record to use, where PATH holds several"
    reset_parser = commands.add_parser("reset", help="mark the blocks of a region not done")
    reset_parser.add_argument("path", type=Path, help=where)
    reset_parser.add_argument("--roi", required=True, help=roi_help)
    reset_parser.add_argument("--task", help=task_help)
    reset_parser.add_argument("--downstream", action="store_true",
                              help="also the blocks of downstream tasks that read them")
    skip_parser = commands.add_parser(
        "skip", help="record the blocks of a region as done without running them")
    skip_parser.add_argument("path", type=Path, help=where)
    skip_parser.add_argument("--roi", required=True, help=roi_help)
    skip_parser.add_argument("--task", help=task_help)
    rerun_parser = commands.add_parser(
        "rerun-block", help="run one block of a BlockwiseTask here, in the foreground")
    rerun_parser.add_argument("path", type=Path, help=where)
    rerun_parser.add_argument("block_id", help="daisy's block id (as status shows it)")
    rerun_parser.add_argument("--task", help=task_help)
    rerun_parser.add_argument("--pdb", action="store_true",
                              help="enter pdb post-mortem where the block fails")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``luigi-daisy`` command."""
    arguments = _parser().parse_args(argv)
    try:
        if arguments.command == "status":
            return status(arguments.path, show_failed=arguments.failed)
        if arguments.command == "reset":
            return reset(arguments.path, arguments.roi, arguments.task, arguments.downstream)
        if arguments.command == "skip":
            return skip(arguments.path, arguments.roi, arguments.task)
        return rerun_block(arguments.path, arguments.block_id, arguments.task,
                           arguments.pdb)
    except (CommandError, LuigiDaisyError) as error:
        print(f"luigi-daisy: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # the reader went away (| head): nothing more to say, and no traceback at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
