"""The ``[luigi_daisy]`` section of ``luigi.cfg``."""

from __future__ import annotations

import difflib

import luigi

from ..errors import ConfigError

SECTION = "luigi_daisy"
LAUNCHERS = ("local", "slurm", "lsf", "command")




class luigi_daisy(luigi.Config):
    """Settings of the ``[luigi_daisy]`` section.

    ``num_workers``, ``max_retries``, ``timeout``, ``fit`` and ``read_write_conflict``
    are the defaults of the parameters of the same names on every ``BlockwiseTask``.
    """

    num_workers = luigi.IntParameter(default=1, description="worker processes per task")
    max_retries = luigi.IntParameter(default=2, description="retries of a failed block")
    timeout = luigi.OptionalFloatParameter(
        default=None, description="seconds a block may run before its worker is stopped")
    fit = luigi.ChoiceParameter(choices=["valid", "overhang", "shrink"], default="valid",
                                description="how blocks at the border are handled")
    read_write_conflict = luigi.BoolParameter(
        default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="whether blocks reading each other's output may not run together")
    ledger_dir = luigi.Parameter(default="luigi_daisy_ledgers",
                                 description="folder of the ledgers of finished blocks")
    pipelining = luigi.BoolParameter(
        default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="run chained blockwise tasks block by block together")
    launcher = luigi.ChoiceParameter(choices=list(LAUNCHERS), default="local",
                                     description="how workers are started: local, slurm, "
                                                 "lsf or command")
    log_dir = luigi.Parameter(default="daisy_logs", description="folder of the worker logs")
    start_method = luigi.ChoiceParameter(
        choices=["spawn", "fork"], default="spawn",
        description="spawn: workers are fresh processes that rebuild the task from its "
                    "family and parameters; fork: forks of the Luigi worker process (a "
                    "process with threads hands its forks locks no one releases)")
    # resources of a worker job (defaults of the BlockwiseTask parameters of these names)
    queue = luigi.Parameter(default="", description="SLURM partition or LSF queue")
    account = luigi.Parameter(default="", description="SLURM account or LSF project")
    walltime = luigi.Parameter(default="", description="wall time per worker job")
    cpus_per_worker = luigi.IntParameter(default=1, description="CPUs per worker job")
    gpus_per_worker = luigi.IntParameter(default=0, description="GPUs per worker job")
    memory_per_worker = luigi.Parameter(default="", description="memory per job, as 16G")
    job_extra = luigi.Parameter(default="", description="extra submit options, as written")
    # launcher = command
    submit_command = luigi.Parameter(default="", description="submit template")
    cancel_command = luigi.Parameter(default="", description="cancel template")
    job_id_pattern = luigi.Parameter(default=r"(\S+)",
                                     description="regex: job id in the submit output")
    status_command = luigi.Parameter(default="",
                                     description="template exiting 0 while a job runs")
    # reaching the server, and the jobs' lives
    host = luigi.Parameter(default="127.0.0.1",
                           description="interface the block server listens on")
    advertise_host = luigi.Parameter(
        default="", description="address workers reach the server at (default: host when "
                                "loopback, else this machine's name)")
    block_map_host = luigi.Parameter(
        default="127.0.0.1", description="interface the run's block map (tracking URL) "
                                         "listens on; 0.0.0.0 serves it to the network")
    worker_death_timeout = luigi.FloatParameter(
        default=60.0, description="seconds after which a worker whose run is gone exits")
    pending_report_after = luigi.FloatParameter(
        default=60.0, description="seconds after which pending jobs are reported")
    job_poll_interval = luigi.FloatParameter(
        default=2.0, description="seconds between two job state queries (squeue, bjobs), "
                                 "at least 1")
    # the run's pool of workers
    total_workers = luigi.OptionalIntParameter(
        default=None, description="the run's budget of workers, shared by its tasks (each "
                                  "task's num_workers is its cap); default: the CPUs this "
                                  "process may use with local workers, else no budget")
    pool_policy = luigi.ChoiceParameter(
        choices=["downstream", "most_ready"], default="downstream",
        description="which task a pool worker serves next: the most downstream task with "
                    "ready blocks, or the task with the most ready blocks")
    # throughput
    prefetch = luigi.IntParameter(
        default=1, description="blocks a worker keeps in hand beyond the one it processes "
                               "(0 to 8); short blocks travel several per frame")


KNOWN_KEYS = frozenset(luigi_daisy.get_param_names())


def _normalised(name: str) -> str:
    return "".join(character for character in name.lower() if character.isalnum())


def _section_names(config) -> list[str]:
    if hasattr(config, "sections"):  # configparser (luigi.cfg)
        return list(config.sections())
    return list(getattr(config, "data", {}) or {})  # TOML


def check_section_name(config) -> None:
    """Refuse sections whose name is a near miss of ``[luigi_daisy]`` (``[luigi-daisy]``,
    ``[Luigi_Daisy]``, ``[luigi_diasy]``, ...): Luigi would ignore them without a word."""
    target = _normalised(SECTION)
    for name in _section_names(config):
        if name == SECTION:
            continue
        normalised = _normalised(name)
        if normalised == target or (
                abs(len(normalised) - len(target)) <= 2 and
                difflib.SequenceMatcher(None, normalised, target).ratio() >= 0.8):
            raise ConfigError(
                f"the Luigi configuration has a section [{name}], which Luigi ignores; "
                f"luigi_daisy reads its settings from [{SECTION}] (with an underscore): "
                f"rename the section")


def _suggestion(key: str) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), sorted(KNOWN_KEYS), n=1)
    return f" ({key}: did you mean {close[0]}?)" if close else ""


def check_section() -> None:
    """Refuse keys of ``[luigi_daisy]`` this package does not know, naming them, and
    sections whose name is a near miss of it."""
    config = luigi.configuration.get_config()
    check_section_name(config)
    if not config.has_section(SECTION):
        return
    if hasattr(config, "defaults"):  # configparser (luigi.cfg)
        keys = set(config[SECTION].keys()) - set(config.defaults())
    else:  # TOML
        keys = set(config.data.get(SECTION, {}))
    unknown = sorted(key for key in keys if key.replace("-", "_") not in KNOWN_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in the "
            f"[{SECTION}] section of the Luigi configuration; the known keys are "
            f"{', '.join(sorted(KNOWN_KEYS))}{''.join(_suggestion(key) for key in unknown)}")


def settings() -> luigi_daisy:
    """The current ``[luigi_daisy]`` settings, after checking the section's keys and
    values (:func:`luigi_daisy.luigi.values.check_settings`, once per distinct set of
    values).

    Raises
    ------
    ConfigError
        Naming the first key that is unknown or whose value is not allowed.
    """
    from .values import check_settings, parse_failure
    check_section()
    try:
        current = luigi_daisy()
    except ValueError:
        failure = parse_failure(luigi_daisy, SECTION)
        if failure is None:
            raise
        raise failure from None
    # Luigi hands out one instance per distinct set of values: each is checked once
    if not current.__dict__.get("_checked"):
        check_settings(current, SECTION)
        current.__dict__["_checked"] = True
    return current
