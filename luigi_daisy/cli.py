"""The ``luigi-daisy`` command.

``luigi-daisy status PATH`` prints, for a ledger folder or one ledger file, each task's
id, geometry and done / failed / total counts; with ``--failed``, also every block that
failed for good (daisy's block id, its write ROI and the last line of its error). It
exits 1 when a task there is incomplete and 2 when PATH holds no readable ledger.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from funlib.geometry import Roi

from .blocks import BlockGrid, daisy_block_id
from .errors import GeometryError
from .ledger import (
    SUFFIX,
    LedgerError,
    find_ledgers,
    is_ledger,
    read_failed_blocks,
    read_ledger_summary,
)
from .summary import error_line

EXIT_INCOMPLETE = 1
EXIT_UNREADABLE = 2


def _ledger_files(path: Path) -> list[Path]:
    if path.is_dir() and not is_ledger(path):
        return find_ledgers(path)
    return [path]


def _format_roi(roi: list | None) -> str:
    if not roi or len(roi) != 2:
        return "(not recorded)"
    begin, shape = roi
    return f"offset {tuple(begin)} shape {tuple(shape)}"


def failed_blocks(path: Path) -> list[tuple[int, str | None]]:
    """``(index, error)`` of every block a ledger records as failed for good."""
    return read_failed_blocks(path)


def _grid_of(geometry: dict) -> BlockGrid | None:
    try:
        rois = [Roi(*geometry[name]) for name in ("total_roi", "read_roi", "write_roi")]
        return BlockGrid(*rois, fit=geometry["fit"])
    except (KeyError, TypeError, ValueError, GeometryError):
        return None


def _print_failed(file: Path, geometry: dict) -> None:
    grid = _grid_of(geometry)
    for index, error in failed_blocks(file):
        if grid is None:
            print(f"    block index {index}: {error_line(error)}")
            continue
        write_roi = grid.rois_of(index)[1]
        print(f"    block {daisy_block_id(grid, index)} (write roi {write_roi}): "
              f"{error_line(error)}")


def status(path: Path, show_failed: bool = False) -> int:
    """Print the state of every ledger under ``path``; return the exit code."""
    files = _ledger_files(path)
    if not files:
        print(f"no ledger files (*{SUFFIX}) in {path}", file=sys.stderr)
        return EXIT_UNREADABLE
    exit_code = 0
    for file in files:
        try:
            summary = read_ledger_summary(file)
        except LedgerError as error:
            print(f"error: {error}", file=sys.stderr)
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
        if show_failed and summary["failed"]:
            print("  failed blocks (daisy block id, write roi: last error line):")
            try:
                _print_failed(file, geometry)
            except LedgerError as error:
                print(f"error: {error}", file=sys.stderr)
                exit_code = EXIT_UNREADABLE
        if not complete and exit_code == 0:
            exit_code = EXIT_INCOMPLETE
    return exit_code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``luigi-daisy`` command."""
    parser = argparse.ArgumentParser(prog="luigi-daisy",
                                     description="Inspect luigi_daisy runs.")
    commands = parser.add_subparsers(dest="command", required=True)
    status_parser = commands.add_parser(
        "status", help="show the finished blocks recorded in ledgers")
    status_parser.add_argument("path", type=Path, help="a ledger folder or one ledger file")
    status_parser.add_argument("--failed", action="store_true",
                               help="list the blocks that failed, with their errors")
    arguments = parser.parse_args(argv)
    if arguments.command == "status":
        return status(arguments.path, show_failed=arguments.failed)
    parser.error(f"unknown command {arguments.command}")
    return EXIT_UNREADABLE


if __name__ == "__main__":
    sys.exit(main())
