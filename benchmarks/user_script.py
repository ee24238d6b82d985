"""One ``run_blockwise`` timed as a user's script times it: from before the import.

``bench_run.py`` and ``bench_startup.py`` start this file in a fresh interpreter per
measurement::

    python user_script.py impl=luigi_daisy case=1d workers=2 [blocks=N] [sleep=S]
        [start_method=spawn] [progress=0] [ledger_dir=PATH] [profile=PATH]

Its first statement reads the clock; only then does it import the package
(``import luigi_daisy`` or ``import daisy``, chosen by ``impl``), build the tasks and
call ``package.run_blockwise(...)``, resolving the name there as a script does. The
process function (:func:`record_block`) appends ``index start end`` per block to a file
per task and worker process, so the first block's start is known wherever it ran. The
result is one line, ``BENCH-RESULT {json}``, with every time in seconds since the epoch
(the driver subtracts): ``started`` (before the import), ``imported``, ``called`` (just
before ``run_blockwise``), ``returned``, each task's ``first_start``, ``last_end`` and
first start per worker process, and the CPU seconds of this process and its reaped
children during the run.

Nothing but ``time``, ``os`` and ``sys`` (which the interpreter has loaded already) is
imported before the clock starts, so the package pays for every module it needs, as in
a user's script. The process function is imported by reference
(``user_script.record_block``) in the workers of both packages, and so costs them the
same.
"""

import time

STARTED = time.time()

import os  # after the clock: the interpreter has loaded it already
import sys

RESULT_MARKER = "BENCH-RESULT "
RECORD_DIR_VARIABLE = "BENCH_USER_SCRIPT_RECORD_DIR"
SLEEP_VARIABLE = "BENCH_USER_SCRIPT_SLEEP"
BLOCKS_1D = 10_000
SIDE_3D = 30  # blocks along each axis
WRITE_3D = 10  # voxels of a write block along each axis
CONTEXT_3D = 1  # voxels of context on each side

_record_files = {}  # task id -> descriptor of this process's record file
_sleep = []  # [seconds] once read from the environment


def record_block(block):
    """Process function: append ``index start end`` for the block to a file of this
    task and process (unbuffered, so the line survives ``os._exit``), after sleeping
    ``BENCH_USER_SCRIPT_SLEEP`` seconds if that is set."""
    start = time.time()
    task_id, index = block.block_id
    descriptor = _record_files.get(task_id)
    if descriptor is None:
        folder = os.environ[RECORD_DIR_VARIABLE]
        path = os.path.join(folder, f"{task_id}.{os.getpid()}.txt")
        descriptor = _record_files[task_id] = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _sleep.append(float(os.environ.get(SLEEP_VARIABLE) or 0))
    if _sleep[0]:
        time.sleep(_sleep[0])
    os.write(descriptor, b"%d %.6f %.6f\n" % (index, start, time.time()))


def build_tasks(package, case, workers, blocks, process_function):
    """The tasks of ``case`` and the number of blocks of each (by task id)."""
    roi = package.Roi

    def task(task_id, total, read, write, conflict, upstream=None):
        kwargs = {"total_roi": total, "read_roi": read, "write_roi": write,
                  "process_function": process_function, "read_write_conflict": conflict,
                  "num_workers": workers, "max_retries": 0, "fit": "valid"}
        if upstream:
            kwargs["upstream_tasks"] = upstream
        return package.Task(task_id, **kwargs)

    if case in ("1d", "chain"):
        total, block = roi((0,), (blocks,)), roi((0,), (1,))
        task_a = task("a", total, block, block, conflict=False)
        if case == "1d":
            return [task_a], {"a": blocks}
        task_b = task("b", total, block, block, conflict=False, upstream=[task_a])
        return [task_a, task_b], {"a": blocks, "b": blocks}
    if case == "3d":
        extent = SIDE_3D * WRITE_3D
        total = roi((-CONTEXT_3D,) * 3, (extent + 2 * CONTEXT_3D,) * 3)
        read = roi((-CONTEXT_3D,) * 3, (WRITE_3D + 2 * CONTEXT_3D,) * 3)
        write = roi((0,) * 3, (WRITE_3D,) * 3)
        return [task("a", total, read, write, conflict=True)], {"a": SIDE_3D**3}
    raise SystemExit(f"unknown case {case!r}")


def read_records(folder, expected):
    """Per task: first start, last end, first start per process; and what is wrong."""
    per_task, problems = {}, []
    for task_id, blocks in expected.items():
        indices, process_firsts = [], []
        first_start = last_end = None
        for name in sorted(os.listdir(folder)):
            if not name.startswith(task_id + "."):
                continue
            with open(os.path.join(folder, name), "rb") as record:
                lines = record.read().splitlines()
            starts = []
            for line in lines:
                index, start, end = line.split()
                indices.append(int(index))
                starts.append(float(start))
                end = float(end)
                last_end = end if last_end is None else max(last_end, end)
            process_firsts.append(min(starts))
        first_start = min(process_firsts) if process_firsts else None
        if len(indices) != blocks or len(set(indices)) != blocks:
            problems.append(f"task {task_id!r}: process function ran {len(indices)} times "
                            f"on {len(set(indices))} distinct blocks, expected {blocks} "
                            f"blocks once each")
        per_task[task_id] = {"first_start": first_start, "last_end": last_end,
                             "process_firsts": process_firsts}
    return per_task, problems


def state_problems(states, expected):
    """What the returned task states say went wrong (nothing when all succeeded)."""
    problems = []
    for task_id, blocks in expected.items():
        state = states[task_id]
        counts = {name: getattr(state, name) for name in (
            "total_block_count", "completed_count", "skipped_count", "failed_count",
            "orphaned_count")}
        if (counts["total_block_count"] != blocks or counts["completed_count"] != blocks
                or counts["skipped_count"] or counts["failed_count"]
                or counts["orphaned_count"]):
            problems.append(f"task {task_id!r}: state {counts}, expected {blocks} blocks "
                            f"completed and none skipped, failed or orphaned")
    return problems


def main(arguments):
    """Run one case; print its result line; return the exit status (2: a wrong run)."""
    options = dict(argument.split("=", 1) for argument in arguments)
    impl, case, workers = options["impl"], options["case"], int(options["workers"])
    if impl == "daisy":
        import daisy as package
    else:
        import luigi_daisy as package
    imported = time.time()
    if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    # by reference in the workers (``user_script.record_block``), not from __main__
    process_function = __import__("user_script").record_block
    record_dir = options["record_dir"]
    os.environ[RECORD_DIR_VARIABLE] = record_dir
    if options.get("sleep"):
        os.environ[SLEEP_VARIABLE] = options["sleep"]
    blocks = int(options.get("blocks", BLOCKS_1D))
    tasks, expected = build_tasks(package, case, workers, blocks, process_function)
    keywords = {"multiprocessing": True, "progress": options.get("progress", "1") == "1",
                "return_states": True}
    if impl != "daisy":
        keywords["start_method"] = options.get("start_method", "spawn")
        if options.get("ledger_dir"):
            keywords["ledger_dir"] = options["ledger_dir"]
    profiler = None
    if options.get("profile"):
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    times_before = os.times()
    called = time.time()
    states = package.run_blockwise(tasks, **keywords)
    returned = time.time()
    times_after = os.times()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(options["profile"])
    problems = state_problems(states, expected)
    per_task, record_problems = read_records(record_dir, expected)
    problems += record_problems
    if problems:
        for problem in problems:
            print(f"ERROR {impl} {case} {workers} workers: {problem}", file=sys.stderr)
        return 2
    import json
    result = {
        "impl": impl, "case": case, "workers": workers, "blocks": sum(expected.values()),
        "started": STARTED, "imported": imported, "called": called, "returned": returned,
        "tasks": per_task,
        "own_cpu_s": (times_after.user + times_after.system
                      - times_before.user - times_before.system),
        "children_cpu_s": (times_after.children_user + times_after.children_system
                           - times_before.children_user - times_before.children_system),
    }
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
