"""Every command and every Python block of README.md runs as written: the README cannot rot.

README.md is cut into its ``##`` sections (the text before the first one is the set-up
section). Each section runs in a fresh folder that looks like the repository root (links
to ``examples/`` and ``benchmarks/``, a copy of ``luigi.cfg``), its fenced blocks in
order, with this Python's ``bin`` folder first on ``PATH`` (so ``python3``, ``luigi``,
``luigid`` and ``luigi-daisy`` are this environment's) and this checkout first on
``PYTHONPATH`` (as ``pip install -e .`` would make it):

- a ``python`` block is saved to a file and run with this Python; it must exit 0;
- a ``bash`` block runs line by line, each line with ``bash -c``; it must exit 0, or
  the status its comment names (``# exits 1: ...``).

Rules for the commands that cannot simply run here, each announced by the README's own
text and checked in another way, never skipped silently:

- ``python3 -m pip install -e '.[extra]' && rest``: the install is not repeated (tests
  run offline); the extra's requirements, read from ``pyproject.toml``, must be
  installed in this environment, and ``rest`` runs.
- ``python3 -m pytest ...`` (the second set-up command) would run this test inside
  itself; ``.ci/run`` runs it, and a test here checks that ``.ci/run`` holds that line
  verbatim.
- a command whose comment says ``runs until stopped`` starts in the background; its
  ``--port`` is replaced, in the whole section, by a free port (the one change made to
  any command: another test may hold the README's port); the rest of the section runs
  once it answers HTTP, and then it is stopped.
- a command whose comment says ``press Ctrl-C`` is sent SIGINT, as a terminal would,
  once a ledger records a finished block, and must then exit.
- Luigi's pid files (one per command line, machine-wide, to refuse a second copy of a
  running command) go to the test's folder (``lock_pid_dir`` in its ``luigi.cfg``), so
  that another test suite running the README's commands at the same time is not taken
  for a second copy.
- the benchmark section's commands take many minutes: they run when
  ``LUIGI_DAISY_README_BENCHMARKS=1`` is set; otherwise the test checks that each names
  an existing script and options its ``--help`` lists, and reports the skip.
"""

from __future__ import annotations

import configparser
import http.client
import importlib.metadata
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from luigi_daisy.cli import find_records
from luigi_daisy.errors import LedgerError
from luigi_daisy.ledger import read_ledger_summary
from luigi_daisy.luigi.config import KNOWN_KEYS

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
COMMAND_DEADLINE = 600.0     # seconds one command or block may take (the default
                             # segmentation takes half a minute, minutes under load)
START_DEADLINE = 30.0        # seconds a background server may take to answer
PROGRESS_DEADLINE = 60.0     # seconds to wait for a finished block before Ctrl-C
STOP_DEADLINE = 30.0         # seconds a stopped command may take to exit
BENCHMARK_SECTION = "Benchmarks"
EXECUTED_LANGUAGES = ("python", "bash")
NOT_EXECUTED_LANGUAGES = ("text",)  # sample output, never a command


@dataclass
class Block:
    language: str
    text: str
    line: int


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


def readme_sections() -> list[Section]:
    """The README's ``##`` sections with their fenced blocks (indented ones included)."""
    sections = [Section("set-up")]
    lines = README.read_text().splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("## "):
            sections.append(Section(line[3:].strip()))
        fence = re.match(r"^(\s*)```(\S*)\s*$", line)
        if fence:
            indent, language = fence.groups()
            start = index + 1
            index += 1
            body = []
            while not lines[index].strip().startswith("```"):
                text = lines[index]
                body.append(text[len(indent):] if text.startswith(indent) else text)
                index += 1
            sections[-1].blocks.append(Block(language, "\n".join(body) + "\n", start))
        index += 1
    return sections


def commands_of(block: Block) -> list[str]:
    """The commands of a bash block: one per line, ``\\`` continuations joined."""
    commands, pending = [], ""
    for line in block.text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def comment_of(command: str) -> str:
    match = re.search(r"\s#\s(.*)$", command)
    return match.group(1) if match else ""


def expected_status(command: str) -> int:
    match = re.search(r"\bexits (\d+)", comment_of(command))
    return int(match.group(1)) if match else 0


# --------------------------------------------------------------------------- environment
def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.pop("LUIGI_CONFIG_PATH", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def repository_like(folder: Path) -> Path:
    """A folder that looks like the repository root to the README's commands."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("examples", "benchmarks"):
        (folder / name).symlink_to(REPO / name, target_is_directory=True)
    # Luigi refuses to start a command while the same command line runs anywhere on the
    # machine (a pid file per command under lock_pid_dir); another checkout's test suite
    # may run the README's commands right now, so each folder keeps its own pid files
    config = (REPO / "luigi.cfg").read_text()
    assert "\n[core]\n" in config, "the shipped luigi.cfg has no [core] section"
    (folder / "luigi.cfg").write_text(
        config.replace("\n[core]\n", f"\n[core]\nlock_pid_dir = {folder / 'luigi-pids'}\n", 1))
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check_extra_installed(extra: str) -> None:
    """What ``pip install -e '.[extra]'`` would install is installed here."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    if extra:
        assert extra in project["optional-dependencies"], f"no extra [{extra}] in pyproject"
        requirements += project["optional-dependencies"][extra]
    for text in requirements:
        requirement = Requirement(text)
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"README installs {text} ([{extra}]), which is not installed here")
        assert requirement.specifier.contains(version, prereleases=True), (text, version)


# --------------------------------------------------------------------------- running
class SectionRun:
    """Runs one section's blocks in one folder; stops what it started in the background."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.env = environment()
        self.background: list[subprocess.Popen] = []
        self.replacements: dict[str, str] = {}
        self.log = folder / "commands.log"

    def output(self) -> str:
        return self.log.read_text()[-6000:] if self.log.exists() else ""

    def start(self, command: str) -> subprocess.Popen:
        with open(self.log, "ab") as log:
            log.write(f"\n$ {command}\n".encode())
            return subprocess.Popen(["bash", "-c", command], cwd=self.folder, env=self.env,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def wait(self, process: subprocess.Popen, command: str) -> int:
        try:
            return process.wait(timeout=COMMAND_DEADLINE)
        except subprocess.TimeoutExpired:
            self.stop(process)
            pytest.fail(f"{command!r} did not finish in {COMMAND_DEADLINE} s:\n{self.output()}")

    def stop(self, process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        for signal_number in (sig, signal.SIGKILL):
            try:
                os.killpg(process.pid, signal_number)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=STOP_DEADLINE)
                return
            except subprocess.TimeoutExpired:
                continue

    def run_python(self, block: Block, number: int) -> None:
        text = block.text
        for old, new in self.replacements.items():
            text = text.replace(old, new)
        script = self.folder / f"readme_block_{number}.py"
        script.write_text(text)
        process = self.start(f"{sys.executable} {script.name}")
        status = self.wait(process, f"the python block at README.md line {block.line}")
        assert status == 0, f"README.md line {block.line}: exit {status}\n{self.output()}"

    def run_bash(self, block: Block) -> None:
        for command in commands_of(block):
            for old, new in self.replacements.items():
                command = command.replace(old, new)
            self.run_command(command, block.line)

    def run_command(self, command: str, line: int) -> None:
        install = re.match(r"^python3 -m pip install -e '\.(?:\[(\w+)\])?'\s*(?:&&\s*(.*))?$",
                           command)
        if install:
            check_extra_installed(install.group(1) or "")
            if install.group(2):
                self.run_command(install.group(2), line)
            return
        if re.match(r"^python3 -m pytest\b", command):
            assert command in (REPO / ".ci" / "run").read_text(), \
                f"README.md line {line}: .ci/run does not run {command!r} verbatim"
            return
        comment = comment_of(command)
        if "runs until stopped" in comment:
            self.start_server(command, line)
            return
        before = self.blocks_done()
        process = self.start(command)
        if "press Ctrl-C" in comment:
            self.interrupt_after_progress(process, command, before)
            return
        status = self.wait(process, command)
        assert status == expected_status(command), \
            f"README.md line {line}: {command!r} exited {status}\n{self.output()}"

    def start_server(self, command: str, line: int) -> None:
        port = re.search(r"--port (\d+)", command)
        assert port, f"README.md line {line}: a server command without --port"
        new_port = str(free_port())
        self.replacements[port.group(1)] = new_port
        process = self.start(command.replace(port.group(1), new_port))
        self.background.append(process)
        deadline = time.monotonic() + START_DEADLINE
        while True:
            assert process.poll() is None, f"{command!r} ended:\n{self.output()}"
            try:
                connection = http.client.HTTPConnection("127.0.0.1", int(new_port), timeout=2)
                connection.request("GET", "/")
                connection.getresponse().read()
                connection.close()
                return
            except OSError:
                assert time.monotonic() < deadline, f"{command!r} never answered HTTP"
                time.sleep(0.1)

    def interrupt_after_progress(self, process: subprocess.Popen, command: str,
                                 before: dict[Path, int]) -> None:
        """Ctrl-C, as a terminal sends it (SIGINT to the foreground process group),
        once the command has recorded a finished block."""
        deadline = time.monotonic() + PROGRESS_DEADLINE
        while not any(done > before.get(ledger, 0)
                      for ledger, done in self.blocks_done().items()):
            assert process.poll() is None, f"{command!r} ended before Ctrl-C:\n{self.output()}"
            assert time.monotonic() < deadline, f"{command!r} recorded no block"
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            self.stop(process)
            pytest.fail(f"{command!r} did not stop on Ctrl-C:\n{self.output()}")

    def blocks_done(self) -> dict[Path, int]:
        """Blocks recorded as done, per ledger below the folder (kept with the data)."""
        done = {}
        for ledger in find_records(self.folder):
            try:
                done[ledger] = read_ledger_summary(ledger)["done"]
            except LedgerError:
                continue
        return done

    def close(self) -> None:
        for process in self.background:
            self.stop(process)


SECTIONS = [section for section in readme_sections() if section.blocks]


def test_every_block_is_python_bash_or_sample_output():
    for section in readme_sections():
        for block in section.blocks:
            assert block.language in EXECUTED_LANGUAGES + NOT_EXECUTED_LANGUAGES, \
                f"README.md line {block.line}: a ```{block.language} block is never run"


@pytest.mark.timeout(1800)
@pytest.mark.parametrize(
    "section", [section for section in SECTIONS if section.title != BENCHMARK_SECTION],
    ids=lambda section: section.title)
def test_readme_section_runs_as_written(section, tmp_path):
    run = SectionRun(repository_like(tmp_path / "repository"))
    cluster = None
    if section.title.startswith("SLURM"):
        # the section's commands submit real jobs: to a single-node SLURM of its own
        cluster = start_slurm()
        run.env["SLURM_CONF"] = cluster.environment["SLURM_CONF"]
    try:
        for number, block in enumerate(section.blocks):
            if block.language == "python":
                run.run_python(block, number)
            elif block.language == "bash":
                run.run_bash(block)
    finally:
        run.close()
        if cluster is not None:
            left = cluster.job_ids()
            cluster.stop()
            assert not left, f"jobs outlived the README's SLURM section: {left}"


def start_slurm():
    """A running single-node SLURM (tests/slurm), or a skip with the reason; a failure
    instead of the skip under ``LUIGI_DAISY_REQUIRE_SLURM=1`` (as in ``.ci/run``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from slurm.cluster import SlurmCluster, SlurmUnavailable, install_packages, missing_programs
    required = os.environ.get("LUIGI_DAISY_REQUIRE_SLURM") == "1"
    problem = None
    if missing_programs():
        problem = install_packages()
    if problem is None:
        cluster = SlurmCluster()
        try:
            return cluster.start()
        except SlurmUnavailable as error:
            problem = f"SLURM did not start: {error}"
    if required:
        pytest.fail(problem)
    pytest.skip(problem)


def test_the_set_up_commands_install_and_run_the_segmentation_and_the_tests():
    set_up = readme_sections()[0].blocks[0]
    commands = commands_of(set_up)
    assert commands[0].startswith("python3 -m pip install -e '.[examples]' && luigi --module "
                                  "examples.segmentation Segmentation")
    assert commands[1] == "python3 -m pip install -e '.[test]' && python3 -m pytest -q"
    assert commands[1] in (REPO / ".ci" / "run").read_text()


def test_the_reference_lists_every_luigi_daisy_key():
    text = README.read_text().split("## Reference", 1)[1].split("\n## ", 1)[0]
    keys = set(re.findall(r"^\| `(\w+)` \|", text, flags=re.MULTILINE))
    assert keys == set(KNOWN_KEYS), (sorted(keys - KNOWN_KEYS), sorted(KNOWN_KEYS - keys))
    shipped = configparser.ConfigParser()
    shipped.read(REPO / "luigi.cfg")
    assert shipped.has_section("retcode"), "README says luigi.cfg holds [retcode]"
    assert shipped["retcode"]["task_failed"] == "30"
    assert shipped["retcode"]["scheduling_error"] == "35"


@pytest.mark.timeout(3600)
def test_benchmark_commands(tmp_path):
    section = next(section for section in SECTIONS if section.title == BENCHMARK_SECTION)
    commands = [command for block in section.blocks for command in commands_of(block)]
    assert commands, "the benchmark section quotes no command"
    for command in commands:
        script = re.match(r"^python3 (benchmarks/\S+\.py)((?:\s+--?[\w-]+(?:\s+[^-\s]\S*)?)*)"
                          r"\s*(?:#.*)?$", command)
        assert script, f"not a benchmark command: {command!r}"
        assert (REPO / script.group(1)).exists(), command
        usage = subprocess.run([sys.executable, str(REPO / script.group(1)), "--help"],
                               capture_output=True, text=True, env=environment(), timeout=60)
        assert usage.returncode == 0, usage.stderr
        for option in re.findall(r"(--[\w-]+)", script.group(2)):
            assert option in usage.stdout, f"{command!r}: {option} is not an option"
    if os.environ.get("LUIGI_DAISY_README_BENCHMARKS") != "1":
        pytest.skip(f"{len(commands)} benchmark commands checked but not run (minutes "
                    f"each); set LUIGI_DAISY_README_BENCHMARKS=1 to run them")
    run = SectionRun(repository_like(tmp_path / "repository"))
    try:
        for block in section.blocks:
            run.run_bash(block)
    finally:
        run.close()
