"""``Context``: what a worker needs to know to reach its block server.

It travels to worker processes in an environment variable as ``key=value`` pairs
separated by ``:``, the format daisy uses, so scripts that read ``DAISY_CONTEXT`` keep
working.
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote, unquote

from .errors import ContextError

ENV_VARIABLE = "LUIGI_DAISY_CONTEXT"
DAISY_ENV_VARIABLE = "DAISY_CONTEXT"




class Context(dict):
    """A dict of strings describing one worker: ``hostname``, ``port``, ``task_id``,
    ``worker_id`` and, when the server asks for one, ``token``."""

    ENV_VARIABLE = ENV_VARIABLE

    def to_env(self) -> str:
        """Encode as the value of ``LUIGI_DAISY_CONTEXT``.

        Keys and values are percent-encoded, so hosts like ``::1`` and task ids with
        ``:`` or ``=`` travel intact; plain values read as in daisy.
        """
        return ":".join(f"{quote(str(key), safe='')}={quote(str(value), safe='')}"
                        for key, value in self.items())

    @classmethod
    def from_string(cls, text: str) -> Context:
        """Parse the ``key=value:key=value`` form."""
        context = cls()
        for item in text.split(":"):
            if not item:
                continue
            key, separator, value = item.partition("=")
            if not separator:
                raise ContextError(
                    f"cannot parse worker context {text!r}: item {item!r} is not key=value")
            context[unquote(key)] = unquote(value)
        return context

    @classmethod
    def from_env(cls) -> Context:
        """Read ``LUIGI_DAISY_CONTEXT``, or daisy's ``DAISY_CONTEXT``."""
        text = os.environ.get(ENV_VARIABLE) or os.environ.get(DAISY_ENV_VARIABLE)
        if text is None:
            raise ContextError(
                f"neither {ENV_VARIABLE} nor {DAISY_ENV_VARIABLE} is set: a Client runs "
                f"inside a worker started by run_blockwise, which sets it")
        return cls.from_string(text)


def safe_file_name(name: str) -> str:
    """``name`` (a task id) made safe as one file name: no separators, no ``..``."""
    safe = re.sub(r"[^A-Za-z0-9_.=+-]", "_", name)
    return "_" + safe if safe.startswith(".") else safe
