"""The worker entry point, ``python -m luigi_daisy.worker``, and the generic worker loop.

Every launcher starts workers with the same command. A worker reads its context (server
address, task, worker id, token) from ``LUIGI_DAISY_CONTEXT`` (a cluster job: from the
file named by ``LUIGI_DAISY_CONTEXT_FILE``, deleted once read) and what to run, a
:class:`~luigi_daisy.payload.WorkerPayload`, from the pipe named by ``--payload-fd N``
(a local child) or from the file named by ``LUIGI_DAISY_PAYLOAD_FILE`` (a cluster job).
``LUIGI_DAISY_PARENT_PID`` asks the kernel to kill the worker when that process dies.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback

from . import watchdog
from .blocks import Block, BlockStatus
from .context import DAISY_ENV_VARIABLE, ENV_VARIABLE, Context
from .errors import WorkerSetupError

logger = logging.getLogger(__name__)

#: a worker that fails this many blocks in a row asks to be replaced by a fresh process
MAX_CONSECUTIVE_FAILURES = 3

#: exit code of a worker that asks to be restarted
EXIT_RESTART_ME = 75


def takes_block(process_function) -> bool:
    """Whether ``process_function`` is called once per block (True) or is a worker
    loop of its own that makes a ``Client`` (a function without arguments)."""
    import inspect  # here: a worker's start is on the critical path of every run
    try:
        signature = inspect.signature(process_function)
    except (TypeError, ValueError):
        return True
    return any(
        parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD,
                           parameter.VAR_POSITIONAL)
        for parameter in signature.parameters.values())


def process_one_block(process_function, block: Block) -> Exception | None:
    """Run a process function on a block and record the outcome in ``block.status``.

    An exception fails the block (its traceback goes to ``block.error`` and the log),
    never the caller, and is returned; a function that sets ``block.status = FAILED``
    fails it too. The function sees the block as ``PROCESSING``, as daisy's workers do.
    """
    block.status = BlockStatus.PROCESSING
    try:
        process_function(block)
    except Exception as error:  # noqa: BLE001 - a user function may raise anything
        block.status = BlockStatus.FAILED
        block.error = traceback.format_exc()
        logger.error("block %s of task %r failed:\n%s", block.block_id[1], block.task_id,
                     block.error)
        return error
    if block.status != BlockStatus.FAILED:
        block.status = BlockStatus.SUCCESS
    return None


def run_worker(process_function, context: Context) -> int:
    """Process blocks until the server says the task is done; return an exit code.

    Returns :data:`EXIT_RESTART_ME` after :data:`MAX_CONSECUTIVE_FAILURES` failed blocks
    in a row, so that the launcher replaces this process with a fresh one. A
    :class:`~luigi_daisy.errors.WorkerSetupError` (this worker cannot process any block
    of the task) is reported to the server, which stops the task; it ends a task's own
    worker at once, while a pool worker goes on serving the pool's other tasks.
    """
    if not takes_block(process_function):
        process_function()
        return 0
    # imported here: a run imports this module before its workers start, and needs no client
    from .client import Client

    client = Client(context)
    restartable = context.get("restartable", "1") == "1"
    consecutive_failures = 0
    block = client.next_block()
    while block is not None:
        error = process_one_block(process_function, block)
        if isinstance(error, WorkerSetupError):
            client.cannot_work(block, block.error)
            if getattr(process_function, "serves_several_tasks", False):
                block = client.next_block()  # a pool worker goes on with the other tasks
                continue
            client.close()
            return 0
        if block.status == BlockStatus.FAILED:
            consecutive_failures += 1
            if restartable and consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                client.report(block)
                client.close()  # blocks still in hand go back unstarted
                return EXIT_RESTART_ME
        else:
            consecutive_failures = 0
        block = client.next_block(block)
    client.close()
    return 0


#: environment variable: pid of the run's process; the worker dies with it
PARENT_PID_VARIABLE = "LUIGI_DAISY_PARENT_PID"

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when ``parent_pid`` (its parent) dies (Linux),
    so a crashed run leaves no worker behind holding its blocks, sockets or locks."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


#: glibc ``mallopt`` parameters, and what a worker sets them to (see :func:`keep_freed_memory`)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 128 << 20
#: environment variables through which a user sets glibc's malloc: then it is left alone
_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                     "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES", "LD_PRELOAD")


def keep_freed_memory() -> bool:
    """Have glibc keep the memory of a block's freed arrays for the next block.

    By default glibc maps arrays above an adaptive threshold one by one and gives freed
    memory at the heap's top back to the kernel, so every block's fresh arrays are
    faulted in again, page by page: 1.7 million minor faults and 1.5 s of CPU of the
    512^3 segmentation (``benchmarks/README.md``). A worker processes one block after
    another of similar sizes, so arrays up to 32 MiB come from the heap and up to
    128 MiB of freed heap is kept. Left alone when the user set glibc's malloc
    (``MALLOC_*`` variables, ``GLIBC_TUNABLES``, a preloaded allocator) and on other C
    libraries. Returns whether it was set.
    """
    if any(name in os.environ for name in _MALLOC_VARIABLES):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def configure_worker_logging() -> None:
    """Line-buffered output and INFO logging to stderr (the worker's ``.err`` file)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)
        except (AttributeError, ValueError):
            pass
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    """Run one worker: read the context and the payload, process blocks, return the
    exit code (0: the worker is done or chose to stop; see :func:`run_worker`)."""
    from .errors import PayloadError
    from .payload import (
        CONTEXT_FILE_VARIABLE,
        PAYLOAD_FILE_VARIABLE,
        read_context_file,
        read_payload_file,
        read_payload_from_fd,
    )

    # no argparse: a worker's start is on the critical path of every run
    arguments = sys.argv[1:] if argv is None else list(argv)
    payload_fd = None
    if arguments[:1] == ["--payload-fd"] and len(arguments) == 2 and arguments[1].isdigit():
        payload_fd = int(arguments[1])
    elif arguments:
        sys.stderr.write(f"usage: python -m luigi_daisy.worker [--payload-fd N]\n"
                         f"(context in {ENV_VARIABLE}; payload from the inherited pipe N "
                         f"or the file named by {PAYLOAD_FILE_VARIABLE})\n")
        return 2
    # popped: not for the processes this one starts (a batch run started from a block)
    parent_pid = os.environ.pop(PARENT_PID_VARIABLE, None)
    if parent_pid:
        die_with_parent(int(parent_pid))
    keep_freed_memory()
    configure_worker_logging()
    if os.environ.get(CONTEXT_FILE_VARIABLE):  # a cluster job's context (its token)
        try:
            text = read_context_file(os.environ.pop(CONTEXT_FILE_VARIABLE))
        except PayloadError as error:
            sys.stderr.write(f"worker stopped: {error}\n")
            return 1
        os.environ[ENV_VARIABLE] = os.environ[DAISY_ENV_VARIABLE] = text
    context = Context.from_env()
    watchdog.start(context)  # a worker whose run is gone exits on its own
    os.environ.setdefault(ENV_VARIABLE, context.to_env())
    os.environ.setdefault(DAISY_ENV_VARIABLE, context.to_env())
    try:
        if payload_fd is not None:
            payload = read_payload_from_fd(payload_fd)
        elif os.environ.get(PAYLOAD_FILE_VARIABLE):
            payload = read_payload_file(os.environ[PAYLOAD_FILE_VARIABLE])
        else:
            raise PayloadError(f"no payload: pass --payload-fd N or set "
                               f"{PAYLOAD_FILE_VARIABLE}")
        process_function = payload.target.process_function()
        return run_worker(process_function, context)
    except Exception:  # noqa: BLE001 - whatever ends the worker goes to its log
        sys.stderr.write(f"worker {context.get('worker_id')} of task "
                         f"{context.get('task_id')!r} stopped:\n{traceback.format_exc()}")
        return 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


if __name__ == "__main__":
    sys.exit(main())
