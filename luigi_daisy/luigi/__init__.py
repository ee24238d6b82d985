"""The Luigi layer: ``BlockwiseTask``, ledger targets, the ``[luigi_daisy]`` section."""

from .config import ConfigError, luigi_daisy
from .targets import LedgerTarget, ZarrTarget
from .task import BlockwiseRunError, BlockwiseTask

__all__ = ["BlockwiseRunError", "BlockwiseTask", "ConfigError", "LedgerTarget", "ZarrTarget",
           "luigi_daisy"]
