"""What each setting of the Luigi layer allows, and the checks that refuse the rest.

A ``luigi`` run exits with ``[retcode] scheduling_error`` (35 in the shipped
``luigi.cfg``) only for errors raised while Luigi schedules its tasks, in ``complete()``
or ``requires()``; an error while the command line's task is built exits with
``unhandled_exception`` and a traceback, and one in ``run()`` with ``task_failed``, after
locks were taken. So a value a ``BlockwiseTask`` parameter cannot parse is kept as an
:class:`Unparsed` when the task is built, and every value is checked by
``BlockwiseTask.check_config``, which ``complete()`` calls first: one
:class:`~luigi_daisy.errors.ConfigError` naming the key, the value given, where it came
from and what is allowed, before anything starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from configparser import NoOptionError, NoSectionError
from dataclasses import dataclass

import luigi

from ..checks import (
    MIN_WORKER_DEATH_TIMEOUT,
    check_folder,
    check_folder_not_shared,
    check_host,
)
from ..context import MAX_PREFETCH
from ..errors import ConfigError, LauncherError
from ..launchers.batch import parse_memory_mb, parse_walltime_seconds


@dataclass(frozen=True)
class Unparsed:
    """A configured value its parameter could not parse (kept so that it is refused
    when the task is checked, while Luigi schedules it)."""

    raw: str
    #: ``"in [Smooth]"``, ``"in [luigi_daisy]"`` or ``"on the command line"``
    source: str

    def __str__(self) -> str:
        return self.raw


def _parses(parse: Callable[[str], object]) -> Callable[[object], bool]:
    def valid(value: object) -> bool:
        if value in ("", None):
            return True
        try:
            parse(str(value))
        except LauncherError:
            return False
        return True
    return valid


def _int_from(low: int, high: float = math.inf) -> Callable[[object], bool]:
    return lambda value: type(value) is int and low <= value <= high


def _seconds_from(low: float, strictly: bool = False) -> Callable[[object], bool]:
    def valid(value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return math.isfinite(value) and (value > low if strictly else value >= low)
    return valid


_WALLTIMES = ("minutes (90), hours:minutes:seconds (01:30:00) or "
              "days-hours:minutes:seconds (1-12:00:00)")

#: key -> (whether a value is allowed, what is allowed)
RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "num_workers": (_int_from(1), "an integer, 1 or more"),
    "max_retries": (_int_from(0), "an integer, 0 or more"),
    "timeout": (lambda value: value is None or _seconds_from(0, strictly=True)(value),
                "a number of seconds above 0, or nothing for no limit"),
    "fit": (lambda value: value in ("valid", "overhang", "shrink"),
            "valid, overhang or shrink"),
    "read_write_conflict": (lambda value: isinstance(value, bool), "true or false"),
    "pipelining": (lambda value: isinstance(value, bool), "true or false"),
    "launcher": (lambda value: value in ("local", "slurm", "lsf", "command"),
                 "local, slurm, lsf or command"),
    "start_method": (lambda value: value in ("spawn", "fork"), "spawn or fork"),
    "cpus_per_worker": (_int_from(1), "an integer, 1 or more"),
    "gpus_per_worker": (_int_from(0), "an integer, 0 or more"),
    "memory_per_worker": (_parses(parse_memory_mb),
                          "a number with an optional unit K, M, G or T (16G, 500M), or "
                          "nothing"),
    "walltime": (_parses(parse_walltime_seconds), f"{_WALLTIMES}, or nothing"),
    "worker_death_timeout": (_seconds_from(MIN_WORKER_DEATH_TIMEOUT),
                             f"a number of seconds, {MIN_WORKER_DEATH_TIMEOUT:g} or more "
                             f"(a worker cannot notice sooner that its run is gone)"),
    "pending_report_after": (_seconds_from(0), "a number of seconds, 0 or more"),
    "prefetch": (_int_from(0, MAX_PREFETCH), f"an integer from 0 to {MAX_PREFETCH}"),
    "total_workers": (lambda value: value is None or _int_from(1)(value),
                      "an integer, 1 or more, or nothing for the CPUs this process may use"),
    "pool_policy": (lambda value: value in ("downstream", "most_ready"),
                    "downstream or most_ready"),
}


def describe(key: str, value: object, source: str) -> str:
    """``<key> = <value> (<source>): give <what is allowed>``."""
    return f"{key} = {str(value)!r} ({source}): give {RULES[key][1]}"


def problem_of(key: str, value: object, source: str) -> str | None:
    """Why ``value`` is not allowed for ``key``, or None; ``source`` says where it was
    set (a value that could not be parsed knows where it came from)."""
    if isinstance(value, Unparsed):
        return describe(key, value, value.source)
    rule = RULES.get(key)
    if rule is not None and not rule[0](value):
        return describe(key, value, source)
    return None


class LenientParse:
    """Mixin for a Luigi parameter: a configured value it cannot parse becomes an
    :class:`Unparsed` instead of an error while the task is built (see the module's
    docstring). Values passed to the constructor are normalised as usual."""

    def _lenient(self, raw, source: str):
        try:
            return super().parse(raw)  # type: ignore[misc]
        except ValueError:
            return Unparsed(str(raw), source)

    def parse(self, x):
        # Luigi parses the flags of the command line's own task with parse() itself
        return self._lenient(x, "on the command line")

    def _get_value_from_config(self, section, name):
        try:
            raw = luigi.configuration.get_config().get(section, name)
        except (NoSectionError, NoOptionError, KeyError):
            return luigi.parameter._no_value
        return self._lenient(raw, f"in [{section}]")

    def _parse_or_no_value(self, x):
        if not x:
            return luigi.parameter._no_value
        return self._lenient(x, "on the command line")

    def normalize(self, x):
        if isinstance(x, Unparsed):
            return x
        return super().normalize(x)  # type: ignore[misc]

    def _warn_on_wrong_param_type(self, param_name, param_value):
        if not isinstance(param_value, Unparsed):
            super()._warn_on_wrong_param_type(param_name, param_value)  # type: ignore[misc]


def parse_failure(config_class: type[luigi.Config], section: str) -> ConfigError | None:
    """The first key of ``section`` whose value ``config_class``'s parameter cannot parse,
    as a :class:`ConfigError` that names it (None when each parses)."""
    config = luigi.configuration.get_config()
    for name, parameter in config_class.get_params():
        try:
            raw = config.get(section, name)
        except (NoSectionError, NoOptionError, KeyError):
            continue
        try:
            parameter.normalize(parameter.parse(raw))
        except ValueError:
            if name in RULES:
                return ConfigError(describe(name, raw, f"in [{section}]"))
            return ConfigError(f"{name} = {raw!r} (in [{section}]) cannot be read as the "
                               f"{type(parameter).__name__} it must be")
    return None


def check_settings(config: luigi.Config, section: str) -> None:
    """Refuse the first value of ``config`` (the ``[luigi_daisy]`` settings) that is not
    allowed, naming its key, its value and what is allowed."""
    from .launching import check_job_poll_interval
    check_job_poll_interval(config.job_poll_interval)
    for key in sorted(RULES):
        if hasattr(config, key):
            problem = problem_of(key, getattr(config, key), f"in [{section}]")
            if problem is not None:
                raise ConfigError(problem)
    try:
        check_folder(config.ledger_dir, "ledger_dir")
        check_folder(config.log_dir, "log_dir")
    except ConfigError as error:
        raise ConfigError(f"[{section}] {error}") from None


def check_run_machine(config: luigi.Config, section: str) -> None:
    """Refuse the values of ``config`` (the ``[luigi_daisy]`` settings) that only the
    machine a run starts on can judge: a ``host`` or ``block_map_host`` that is not one
    of its addresses, an existing ``ledger_dir`` or ``log_dir`` its group or others can
    write that is not sticky. ``BlockwiseTask.check_config`` calls it (once per set of
    values), not :func:`check_settings`, which every worker runs too: a worker on
    another node is not where the run listens.
    """
    if config.__dict__.get("_machine_checked"):
        return
    try:
        check_host(config.host, "host")
        check_host(config.block_map_host, "block_map_host")
        check_folder_not_shared(config.ledger_dir, "ledger_dir", "ledger folder")
        check_folder_not_shared(config.log_dir, "log_dir", "log folder")
    except ConfigError as error:
        raise ConfigError(f"[{section}] {error}") from None
    config.__dict__["_machine_checked"] = True
