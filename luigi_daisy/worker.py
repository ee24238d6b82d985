"""The generic worker loop: run a task's process function on block after block."""

from __future__ import annotations

import inspect
import logging
import traceback

from .blocks import Block, BlockStatus
from .client import Client
from .context import Context
from .errors import WorkerSetupError

logger = logging.getLogger(__name__)

#: a worker that fails this many blocks in a row asks to be replaced by a fresh process
MAX_CONSECUTIVE_FAILURES = 3

#: exit code of a worker that asks to be restarted
EXIT_RESTART_ME = 75


def takes_block(process_function) -> bool:
    """Whether ``process_function`` is called once per block (True) or is a worker
    loop of its own that makes a ``Client`` (a function without arguments)."""
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
    :class:`~luigi_daisy.errors.WorkerSetupError` (this worker cannot process any block)
    is reported to the server, which stops the task, and ends the worker at once.
    """
    if not takes_block(process_function):
        process_function()
        return 0
    client = Client(context)
    restartable = context.get("restartable", "1") == "1"
    consecutive_failures = 0
    block = client.acquire()
    while block is not None:
        error = process_one_block(process_function, block)
        if isinstance(error, WorkerSetupError):
            client.cannot_work(block, block.error)
            client.close()
            return 0
        if block.status == BlockStatus.FAILED:
            consecutive_failures += 1
            if restartable and consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                client.release(block)
                client.close()
                return EXIT_RESTART_ME
        else:
            consecutive_failures = 0
        block = client.release_and_acquire(block)
    client.close()
    return 0
