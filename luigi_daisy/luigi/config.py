"""The ``[luigi_daisy]`` section of ``luigi.cfg``."""

from __future__ import annotations

import difflib

import luigi

from ..errors import ConfigError

SECTION = "luigi_daisy"
LAUNCHERS = ("local",)




class luigi_daisy(luigi.Config):  # noqa: N801 - Luigi names a Config class after its section
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
                                     description="how worker processes are started")
    log_dir = luigi.Parameter(default="daisy_logs", description="folder of the worker logs")
    start_method = luigi.ChoiceParameter(
        choices=["spawn", "fork"], default="spawn",
        description="spawn: workers are fresh processes that rebuild the task from its "
                    "family and parameters; fork: forks of the Luigi worker process (a "
                    "process with threads hands its forks locks no one releases)")


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
    """The current ``[luigi_daisy]`` settings, after checking the section's keys."""
    check_section()
    return luigi_daisy()
