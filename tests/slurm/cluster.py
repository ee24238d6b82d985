"""A single-node SLURM on 127.0.0.1 for tests and benchmarks, started and stopped by pid.

Everything (munge key and socket, slurm.conf, state, spool, logs, pid files) lives in one
fresh temporary folder; the daemons listen on explicit free ports. ``stop()`` cancels
every job, sends SIGTERM to the daemons by their pid files and SIGKILL to stragglers.

Command line (for trying things by hand)::

    python tests/slurm/cluster.py start     # prints SLURM_CONF=... and the folder
    python tests/slurm/cluster.py stop FOLDER
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DAEMONS = ("slurmd", "slurmctld", "munged")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
#: seconds to wait for the node to become idle
START_TIMEOUT = 60.0


class SlurmUnavailable(RuntimeError):
    """SLURM's programs are missing or its daemons did not start."""


def missing_programs() -> list[str]:
    """SLURM and munge programs not on this machine."""
    programs = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo",
                "munged")
    search = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [name for name in programs if shutil.which(name, path=search) is None]


def install_packages(timeout: float = 600) -> str | None:
    """Install SLURM and munge with apt-get when they are missing; None when they are
    there afterwards, else why not (not root, no apt-get, apt-get failed)."""
    if not missing_programs():
        return None
    if os.geteuid() != 0:
        return "SLURM is missing and installing it needs root"
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        return "SLURM is missing and there is no apt-get to install it"
    environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in ([apt_get, "update", "-qq"],
                    [apt_get, "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                    env=environment)
        except subprocess.TimeoutExpired:
            return f"{' '.join(command)} took longer than {timeout} s"
        if result.returncode != 0:
            return (f"{' '.join(command)} exited with {result.returncode}: "
                    f"{result.stderr.strip()[-1000:]}")
    missing = missing_programs()
    return f"still missing after apt-get install: {', '.join(missing)}" if missing else None


def _program(name: str) -> str:
    search = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    found = shutil.which(name, path=search)
    if found is None:
        raise SlurmUnavailable(f"{name} is not installed (apt-get install {' '.join(PACKAGES)})")
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _machine() -> tuple[int, int]:
    """Real memory in MB, as ``slurmd -C`` reports it, and the CPU count."""
    output = subprocess.run([_program("slurmd"), "-C"], capture_output=True, text=True,
                            timeout=30, check=True).stdout
    fields = dict(item.split("=", 1) for item in output.split() if "=" in item)
    return int(fields["RealMemory"]), int(fields["CPUs"])


class SlurmCluster:
    """One single-node SLURM (partitions ``main``, the default, and ``other``).

    Parameters
    ----------
    cpus:
        CPUs the node declares (may exceed the machine's: jobs in tests are small).
    """

    def __init__(self, cpus: int = 32) -> None:
        self.cpus = cpus
        self.root: Path | None = None
        self.environment: dict[str, str] = {}

    # ------------------------------------------------------------------ start
    def start(self) -> SlurmCluster:
        """Write the configuration, start munged, slurmctld and slurmd, wait for idle."""
        # munge's socket path must stay short: a folder right under the temp dir
        self.root = Path(tempfile.mkdtemp(prefix="ldslurm"))
        self.root.chmod(0o755)
        for name in ("state", "spool", "log", "run", "munge"):
            (self.root / name).mkdir()
            (self.root / name).chmod(0o755)
        try:
            self._start_munge()
            self._write_configuration()
            self.environment = {"SLURM_CONF": str(self.root / "slurm.conf")}
            self._run_daemon([_program("slurmctld"), "-c", "-f", str(self.conf)])
            self._run_daemon([_program("slurmd"), "-c", "-N", "localhost", "-f",
                              str(self.conf)])
            self._wait_until_idle()
        except SlurmUnavailable as error:
            logs = self.log_tails()
            self.stop()
            raise SlurmUnavailable(f"{error}\n{logs}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of the daemons' logs (for error messages)."""
        parts = []
        for name in ("munged", "slurmctld", "slurmd"):
            try:
                text = (self.root / "log" / f"{name}.log").read_text(errors="replace")
            except OSError:
                continue
            parts.append(f"--- {name}.log\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

    @property
    def conf(self) -> Path:
        """Path of slurm.conf."""
        return self.root / "slurm.conf"

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = self.root / "munge" / "socket"
        self._run_daemon([
            _program("munged"), "--force", f"--key-file={key}",
            f"--socket={self.munge_socket}", f"--pid-file={self.root / 'run' / 'munged.pid'}",
            f"--log-file={self.root / 'log' / 'munged.log'}",
            f"--seed-file={self.root / 'munge' / 'seed'}"])
        deadline = time.monotonic() + 15
        while not self.munge_socket.exists():
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"munged did not create {self.munge_socket}; see "
                                       f"{self.root / 'log' / 'munged.log'}")
            time.sleep(0.05)

    def _write_configuration(self) -> None:
        memory_mb, _ = _machine()
        fields = {
            "slurmctld_port": _free_port(), "slurmd_port": _free_port(),
            "munge_socket": self.munge_socket, "state_dir": self.root / "state",
            "spool_dir": self.root / "spool", "run_dir": self.root / "run",
            "log_dir": self.root / "log", "cpus": self.cpus,
            # a node declaring more memory than slurmd finds is drained
            "memory_mb": max(memory_mb - 512, 256), "root": self.root,
        }
        for index in range(2):
            (self.root / f"gpu{index}").touch()
        for template in ("slurm.conf", "gres.conf"):
            text = string.Template((HERE / f"{template}.in").read_text())
            (self.root / template).write_text(text.substitute(fields))

    def _run_daemon(self, command: list[str]) -> None:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                env={**os.environ, **self.environment})
        if result.returncode != 0:
            raise SlurmUnavailable(
                f"{' '.join(command)} exited with {result.returncode}: "
                f"{result.stderr.strip() or result.stdout.strip()}; logs in {self.root / 'log'}")

    def _wait_until_idle(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        state = ""
        while time.monotonic() < deadline:
            result = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            state = result.stdout.strip()
            states = state.splitlines()
            if result.returncode == 0 and states and all(
                    line.startswith("idle") for line in states):
                return
            if any(line.startswith(("inval", "drain")) for line in states):
                break
            time.sleep(0.1)
        raise SlurmUnavailable(f"the SLURM node did not become idle within {START_TIMEOUT} s "
                               f"(sinfo says {state!r}); logs in {self.root / 'log'}")

    # ------------------------------------------------------------------ use
    def env(self) -> dict[str, str]:
        """This process's environment with ``SLURM_CONF`` pointing at this cluster."""
        return {**os.environ, **self.environment}

    def run(self, command: list[str], check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return subprocess.run([_program(command[0]), *command[1:]], capture_output=True,
                              text=True, timeout=timeout, check=check, env=self.env())

    def job_ids(self) -> list[str]:
        """Ids of the jobs squeue lists as pending or running (or completing)."""
        output = self.run(["squeue", "-h", "-o", "%i"]).stdout
        return output.split()

    def show_job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (``Command``, ``Partition``, ...)."""
        output = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        fields: dict[str, str] = {}
        for item in output.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_until_no_jobs(self, timeout: float, job_ids: list[str] | None = None) -> list[str]:
        """Wait until squeue lists none of ``job_ids`` (any job when None); the rest."""
        deadline = time.monotonic() + timeout
        while True:
            listed = self.job_ids()
            left = listed if job_ids is None else [job for job in listed if job in job_ids]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Cancel every job, stop the daemons by pid, remove the folder."""
        if self.root is None:
            return
        if self.environment:
            try:
                self.run(["scancel", "--full", "--user", str(os.getuid())], check=False)
                self.wait_until_no_jobs(10)
            except (OSError, subprocess.SubprocessError, SlurmUnavailable):
                pass
        pids = []
        for daemon in DAEMONS:
            pid_file = self.root / "run" / f"{daemon}.pid"
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if _alive(pid)]
            time.sleep(0.05)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a daemon started by us and not yet reaped is a zombie: treat it as gone
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if argv[:1] == ["start"]:
        cluster = SlurmCluster().start()
        print(f"SLURM_CONF={cluster.conf}")
        print(f"folder={cluster.root}")
        return 0
    if len(argv) == 2 and argv[0] == "stop":
        cluster = SlurmCluster()
        cluster.root = Path(argv[1])
        cluster.environment = {"SLURM_CONF": str(cluster.root / "slurm.conf")}
        cluster.stop()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
