"""The README's segmentation, three ways, on one raw.zarr, in one run.

    python benchmarks/bench_segmentation.py                 # 512^3 (minutes)
    python benchmarks/bench_segmentation.py --size 256      # a quick run
    python benchmarks/bench_segmentation.py --profile prof  # + where each stage's CPU goes

1. **pipeline**: ``luigi --module examples.segmentation Segmentation --local-scheduler``
   as users run it, in a folder with its own ``luigi.cfg`` (its ``[luigi_daisy]``
   section is ``LUIGI_DAISY_SETTINGS`` below), raw.zarr already made;
2. **reference**: the same smoothing, threshold and ``scipy.ndimage.label`` in one
   process, reading the same raw.zarr and writing smoothed, mask, fragments and labels
   with ``prepare_ds`` (one chunk per block);
3. **dask-image**: ``ndfilters.gaussian_filter`` + threshold + ``ndmeasure.label`` on
   ``da.from_zarr(raw.zarr)``, 2 threads, on a ``--dask-size`` corner of the volume
   (dask-image's label took more than 800 s at 256^3 over zarr 3), stopped after
   ``--dask-timeout`` seconds.

Every variant runs in a process of its own, started by this script, that measures its
whole process tree: wall, CPU (``RUSAGE_CHILDREN`` after waiting, plus its own), the
largest process's peak resident memory (``ru_maxrss``) and the peak of the tree's
summed resident memory (sampled from /proc every 0.1 s). Object counts of the pipeline
and the reference must agree; ratios are against the reference.

daisy 2.0 is not run here: it has no Luigi layer and no array layer, so a daisy version
of this pipeline would be another program (a FaceMerges/MergeTable rewrite on daisy
tasks), not the same work through another scheduler. Block hand-out against daisy 2 is
measured by bench_run.py and bench_pipeline.py.

``--profile DIR`` runs the pipeline once more with cProfile (CPU time, all threads) in
every Python process it starts (a ``sitecustomize`` on PYTHONPATH; nothing in the
package changes) and prints per stage where the CPU of its blocks goes, and what the
processes spent outside blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: the [luigi_daisy] section of the pipeline's luigi.cfg: one pool of 2 workers per run
#: (each stage's num_workers below is its cap)
LUIGI_DAISY_SETTINGS: dict[str, str] = {"total_workers": "2"}
#: the example's own parameters on the pipeline's command line (its stages pass
#: --num-workers on to every blockwise task)
PIPELINE_ARGUMENTS: list[str] = ["--num-workers", "2"]
#: what the reference and dask-image use: the example's defaults
SIGMA, LEVEL, BLOCK = 2.0, 105.0, 64


# --------------------------------------------------------------------------- helpers
def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LUIGI_CONFIG_PATH", None)  # the run folder's luigi.cfg
    env["PYTHONPATH"] = os.pathsep.join(
        [REPOSITORY] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def write_config(folder: str) -> None:
    lines = ["[luigi_daisy]"] + [f"{key} = {value}" for key, value in
                                 LUIGI_DAISY_SETTINGS.items()]
    lines += ["", "[core]", "autoload_range = false", "log_level = WARNING", ""]
    with open(os.path.join(folder, "luigi.cfg"), "w") as file:
        file.write("\n".join(lines))


def luigi_command(task: str, size: int, workdir: str) -> list[str]:
    return [shutil.which("luigi") or "luigi", "--module", "examples.segmentation", task,
            "--size", str(size), "--block-size", str(BLOCK), "--workdir", workdir,
            "--local-scheduler", *PIPELINE_ARGUMENTS]


def tree_rss_kib(root: int) -> int:
    """Summed resident memory of ``root`` and its descendants, in KiB."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        rss[int(entry)] = int(fields[21]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


class TreeMemory:
    """Peak summed RSS of this process's tree, sampled every 0.1 s on a thread."""

    def __init__(self) -> None:
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak_kib = max(self.peak_kib, tree_rss_kib(os.getpid()))

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- variants
def run_pipeline(args: argparse.Namespace) -> dict:
    """In the run folder: the luigi command, then the object count from summary.json."""
    command = luigi_command("Segmentation", args.size, "data")
    completed = subprocess.run(command, cwd=args.folder, env=environment(),
                               capture_output=True, text=True)
    if completed.returncode:
        raise SystemExit(f"pipeline failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    with open(os.path.join(args.folder, "data", "summary.json")) as file:
        summary = json.load(file)
    return {"objects": summary["objects"],
            "stages": {family: round(figures["busy_seconds"], 2)
                       for family, figures in summary["stages"].items()}}


def run_reference(args: argparse.Namespace) -> dict:
    import numpy as np
    from scipy import ndimage

    from examples.segmentation import OUTSIDE, context_of, smooth
    from luigi_daisy import open_ds, prepare_ds

    phases: dict[str, float] = {}

    def phase(name, started):
        phases[name] = phases.get(name, 0.0) + time.process_time() - started

    started = time.process_time()
    raw = open_ds(os.path.join(args.folder, "data", "raw.zarr"))
    roi = raw.roi
    volume = raw[roi]
    phase("read", started)
    started = time.process_time()
    context = context_of(SIGMA)
    padded = np.pad(volume, context, constant_values=OUTSIDE)
    smoothed = smooth(padded, SIGMA)[(slice(context, -context),) * 3]
    mask = (smoothed > LEVEL).astype(np.uint8)
    labels, objects = ndimage.label(mask)
    labels = labels.astype(np.uint64)
    phase("compute", started)
    started = time.process_time()
    out = os.path.join(args.folder, "reference")
    for name, data in (("smoothed", smoothed), ("mask", mask), ("fragments", labels),
                       ("labels", labels)):
        array = prepare_ds(os.path.join(out, f"{name}.zarr"), roi, (1, 1, 1), data.dtype,
                           write_size=(BLOCK,) * 3, mode="w")
        array[roi] = data
    phase("write", started)
    return {"objects": int(objects), "phases": {k: round(v, 2) for k, v in phases.items()}}


def run_dask(args: argparse.Namespace) -> dict:
    import dask
    import dask.array as da
    from dask_image import ndfilters, ndmeasure
    from scipy import ndimage

    from examples.segmentation import OUTSIDE, TRUNCATE, smooth

    size = args.dask_size
    raw = da.from_zarr(os.path.join(args.folder, "data", "raw.zarr"))[:size, :size, :size]
    with dask.config.set(scheduler="threads", num_workers=2):
        smoothed = ndfilters.gaussian_filter(raw.astype("float32"), SIGMA, mode="constant",
                                             cval=float(OUTSIDE), truncate=TRUNCATE)
        labels, count = ndmeasure.label(smoothed > LEVEL)
        objects = int(count.compute())
    # the same corner in one piece with scipy, to check the count
    volume = raw.compute()
    expected = ndimage.label(smooth(volume, SIGMA) > LEVEL)[1]
    return {"objects": objects, "expected_objects": int(expected), "size": size}


VARIANTS = {"pipeline": run_pipeline, "reference": run_reference, "dask-image": run_dask}


def child(args: argparse.Namespace) -> None:
    """Run one variant here and print its figures as one JSON line."""
    with TreeMemory() as memory:
        wall = time.perf_counter()
        result = VARIANTS[args.child](args)
        wall = time.perf_counter() - wall
    own = resource.getrusage(resource.RUSAGE_SELF)
    tree = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.update(
        wall=wall, user=own.ru_utime + tree.ru_utime, system=own.ru_stime + tree.ru_stime,
        largest_process_mib=max(own.ru_maxrss, tree.ru_maxrss) / 1024,
        tree_peak_mib=max(memory.peak_kib, own.ru_maxrss) / 1024,
        minor_faults=own.ru_minflt + tree.ru_minflt,
        context_switches=own.ru_nvcsw + own.ru_nivcsw + tree.ru_nvcsw + tree.ru_nivcsw)
    print("RESULT " + json.dumps(result), flush=True)


#: the reference as run: with numpy's default (it asks the kernel for transparent huge
#: pages on arrays of 4 MiB and more), and without: on a kernel that honours the request
#: with fragmented memory, the first touch of the reference's GB arrays costs it 14 to 28
#: s of system time (benchmarks/README.md). The faster of the two is the yardstick.
REFERENCES = {"reference": {}, "reference, no THP": {"NUMPY_MADVISE_HUGEPAGE": "0"}}


def measure(variant: str, args: argparse.Namespace, timeout: float | None = None) -> dict:
    """Run ``variant`` in a child process (its own session, so a stop ends its tree)."""
    extra = REFERENCES.get(variant, {})
    command = [sys.executable, os.path.abspath(__file__), "--child",
               "reference" if variant in REFERENCES else variant,
               "--folder", args.folder, "--size", str(args.size),
               "--dask-size", str(args.dask_size)]
    process = subprocess.Popen(command, env={**environment(), **extra}, stdout=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return {"stopped_after": timeout}
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if process.returncode or not lines:
        raise SystemExit(f"{variant} failed with exit code {process.returncode}")
    return json.loads(lines[-1][len("RESULT "):])


def fresh_pipeline_folder(args: argparse.Namespace, pristine: str) -> None:
    """The run folder as it was after raw.zarr was made (ledgers included)."""
    shutil.rmtree(args.folder, ignore_errors=True)
    shutil.copytree(pristine, args.folder, symlinks=True)


# --------------------------------------------------------------------------- profile
SITECUSTOMIZE = textwrap.dedent("""\
    import os
    if os.environ.get("BENCH_PROFILE_DIR"):
        import atexit, cProfile, json, resource, sys, time
        _profile = cProfile.Profile(time.process_time)
        _profile.enable()

        def _dump():
            _profile.disable()
            folder = os.environ["BENCH_PROFILE_DIR"]
            _profile.dump_stats(os.path.join(folder, f"{os.getpid()}.prof"))
            usage = resource.getrusage(resource.RUSAGE_SELF)
            with open(os.path.join(folder, f"{os.getpid()}.json"), "w") as file:
                json.dump({"argv": sys.argv, "user": usage.ru_utime,
                           "system": usage.ru_stime, "minor_faults": usage.ru_minflt},
                          file)

        atexit.register(_dump)
""")

#: callees of a stage's compute() and what the breakdown calls them
PHASES = {
    "__getitem__": "read", "to_ndarray": "read", "__setitem__": "write",
    "smooth": "compute", "smooth_inside": "compute", "label": "compute",
    "unique": "compute", "render": "compute",
    "write_atomically": "write", "searchsorted": "compute", "stack": "compute",
    "concatenate": "compute", "astype": "compute", "zeros_like": "compute",
}


def profile_pipeline(args: argparse.Namespace, pristine: str) -> None:
    import pstats

    fresh_pipeline_folder(args, pristine)
    folder = os.path.abspath(args.profile)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    hook = os.path.join(folder, "hook")
    os.makedirs(hook)
    with open(os.path.join(hook, "sitecustomize.py"), "w") as file:
        file.write(SITECUSTOMIZE)
    env = environment()
    env["PYTHONPATH"] = hook + os.pathsep + env["PYTHONPATH"]
    env["BENCH_PROFILE_DIR"] = folder
    subprocess.run(luigi_command("Segmentation", args.size, "data"), cwd=args.folder,
                   env=env, check=True, capture_output=True)
    per_stage: dict[str, dict[str, float]] = {}
    outside = {"workers": 0.0, "worker_processes": 0, "luigi": 0.0, "worker_faults": 0,
               "luigi_faults": 0}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".prof"):
            continue
        with open(os.path.join(folder, name[:-5] + ".json")) as file:
            process = json.load(file)
        cpu = process["user"] + process["system"]
        stats = pstats.Stats(os.path.join(folder, name))
        in_blocks = 0.0
        for (filename, _, function), (_, _, _, cumulative, _) in stats.stats.items():
            if function == "process_block" and filename.endswith("segmentation.py"):
                in_blocks += cumulative
        for (_, _, function), (_, _, _, _, callers) in stats.stats.items():
            for caller in callers:
                caller_file, caller_line, caller_function = caller
                if caller_function != "compute" or not caller_file.endswith("segmentation.py"):
                    continue
                stage = compute_owner(caller_file, caller_line)
                phase = PHASES.get(function, "compute")
                figures = per_stage.setdefault(stage, {})
                figures[phase] = figures.get(phase, 0.0) + callers[caller][3]
        arguments = " ".join(process["argv"])
        if "luigi_daisy.worker" in arguments or "luigi_daisy/worker" in arguments:
            outside["workers"] += cpu - in_blocks
            outside["worker_processes"] += 1
            outside["worker_faults"] += process["minor_faults"]
        else:
            outside["luigi"] += cpu
            outside["luigi_faults"] += process["minor_faults"]
    print(f"\nprofile of one pipeline run (CPU s; cProfile's own cost included), in {folder}:")
    print(f"  {'stage':<16}{'read':>8}{'compute':>9}{'write':>8}")
    for stage, figures in sorted(per_stage.items()):
        print(f"  {stage:<16}{figures.get('read', 0):>8.2f}{figures.get('compute', 0):>9.2f}"
              f"{figures.get('write', 0):>8.2f}")
    print(f"  workers outside blocks ({outside['worker_processes']} processes: start, "
          f"imports, setup, waiting for blocks): {outside['workers']:.2f}")
    print(f"  other processes (luigi, block server, launchers): {outside['luigi']:.2f}")
    print(f"  minor page faults: workers {outside['worker_faults']:,}, other processes "
          f"{outside['luigi_faults']:,}")


def compute_owner(filename: str, line: int) -> str:
    """The class whose compute() starts at ``line`` of ``filename``."""
    with open(filename) as file:
        lines = file.readlines()
    for number in range(line - 1, -1, -1):
        if lines[number].startswith("class "):
            return lines[number].split()[1].split("(")[0]
    return "?"


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="voxels a side (default 512)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of the pipeline and the reference (medians quoted)")
    parser.add_argument("--dask-size", type=int, default=128,
                        help="dask-image runs on this corner of the volume (0: skip it)")
    parser.add_argument("--dask-timeout", type=float, default=300.0)
    parser.add_argument("--profile", metavar="DIR", help="also profile one pipeline run")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    base = args.keep or tempfile.mkdtemp(prefix="bench_segmentation_")
    os.makedirs(base, exist_ok=True)
    pristine = os.path.join(base, "pristine")
    args.folder = os.path.join(base, "run")
    try:
        if not os.path.exists(os.path.join(pristine, "data", "raw.zarr")):
            os.makedirs(pristine, exist_ok=True)
            write_config(pristine)
            print(f"making raw.zarr ({args.size}^3) in {pristine} ...", flush=True)
            subprocess.run(luigi_command("SyntheticVolume", args.size, "data"), cwd=pristine,
                           env=environment(), check=True, capture_output=True)
        print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
              f"{os.cpu_count()} CPUs; [luigi_daisy] {LUIGI_DAISY_SETTINGS or 'defaults'}, "
              f"example arguments {' '.join(PIPELINE_ARGUMENTS)}", flush=True)
        results: dict[str, list[dict]] = {"pipeline": [], **{name: [] for name in REFERENCES}}
        for attempt in range(args.repeat):
            for variant in results:
                fresh_pipeline_folder(args, pristine)
                results[variant].append(measure(variant, args))
                figures = results[variant][-1]
                print(f"  run {attempt + 1} {variant:<18} wall {figures['wall']:6.1f} s  CPU "
                      f"{figures['user'] + figures['system']:6.1f} s  objects "
                      f"{figures['objects']}", flush=True)
        dask_result = None
        if args.dask_size:
            fresh_pipeline_folder(args, pristine)
            dask_result = measure("dask-image", args, timeout=args.dask_timeout)
        report(args, results, dask_result)
        if args.profile:
            profile_pipeline(args, pristine)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


def report(args: argparse.Namespace, results: dict, dask_result: dict | None) -> None:
    def median(variant: str, key) -> float:
        return statistics.median(key(run) for run in results[variant])

    def cpu(run):
        return run["user"] + run["system"]

    yardstick = min(REFERENCES, key=lambda name: median(name, cpu))
    reference_wall = median(yardstick, lambda run: run["wall"])
    reference_cpu = median(yardstick, cpu)
    print(f"\n{args.size}^3, medians of {args.repeat} run(s); load average now "
          f"{os.getloadavg()[0]:.2f}; ratios against {yardstick!r}, the faster reference")
    print(f"  {'variant':<20}{'wall s':>8}{'CPU s':>8}{'user':>7}{'sys':>7}"
          f"{'wall/ref':>9}{'CPU/ref':>8}{'largest MiB':>12}{'tree MiB':>9}{'objects':>8}")
    for variant in results:
        wall = median(variant, lambda run: run["wall"])
        total = median(variant, cpu)
        print(f"  {variant:<20}{wall:>8.1f}{total:>8.1f}"
              f"{median(variant, lambda run: run['user']):>7.1f}"
              f"{median(variant, lambda run: run['system']):>7.1f}"
              f"{wall / reference_wall:>9.2f}{total / reference_cpu:>8.2f}"
              f"{median(variant, lambda run: run['largest_process_mib']):>12.0f}"
              f"{median(variant, lambda run: run['tree_peak_mib']):>9.0f}"
              f"{results[variant][0]['objects']:>8}")
    pipeline_objects = {run["objects"] for run in results["pipeline"]}
    reference_objects = {run["objects"] for name in REFERENCES for run in results[name]}
    agree = pipeline_objects == reference_objects and len(pipeline_objects) == 1
    print(f"  object counts {'agree' if agree else 'DISAGREE'}: pipeline "
          f"{sorted(pipeline_objects)}, reference {sorted(reference_objects)}")
    for variant in results:
        print(f"  {variant}: {median(variant, lambda run: run['minor_faults']):,.0f} minor page "
              f"faults, {median(variant, lambda run: run['context_switches']):,.0f} context "
              f"switches (the whole tree)")
    print(f"  reference phases (CPU s): {results['reference'][0]['phases']}")
    print(f"  pipeline stages (summed block seconds, SyntheticVolume's from making raw.zarr): "
          f"{results['pipeline'][0]['stages']}")
    if dask_result is None:
        print("  dask-image: skipped (--dask-size 0)")
    elif "stopped_after" in dask_result:
        print(f"  dask-image at {args.dask_size}^3: stopped after "
              f"{dask_result['stopped_after']:.0f} s (--dask-timeout)")
    else:
        print(f"  dask-image at {dask_result['size']}^3 (2 threads, da.from_zarr): wall "
              f"{dask_result['wall']:.1f} s, CPU {cpu(dask_result):.1f} s, largest process "
              f"{dask_result['largest_process_mib']:.0f} MiB, objects "
              f"{dask_result['objects']} (scipy on the same corner: "
              f"{dask_result['expected_objects']})")
    print("  daisy 2.0: not run; it has no Luigi or array layer, so the same pipeline on "
          "daisy would be another program (see the docstring)")
    if not agree:
        raise SystemExit("object counts of the pipeline and the reference disagree")


if __name__ == "__main__":
    main()
