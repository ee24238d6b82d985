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

# The context's ``prefetch`` and ``token`` are defined here rather than beside the
# worker's hand (hand.py) and the wire protocol (protocol.py), which re-export them: a
# run makes them before it starts its workers, and imports neither module until after.

#: blocks a worker keeps in hand beyond the one it processes unless told otherwise.
#: Measured with ``benchmarks/bench_load.py`` (1,000 workers, 1 s blocks): idle 0.78%
#: with none, 0.01% with one, 0.01% with two; one hides the round trip, more only
#: keeps blocks from other workers
DEFAULT_PREFETCH = 1
#: most blocks ``prefetch`` may ask to keep in hand
MAX_PREFETCH = 8


def new_token() -> str:
    """Return a fresh run token: 32 random bytes as 64 lowercase hex characters."""
    return os.urandom(32).hex()  # what secrets.token_hex does, without importing hmac


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


#: longest file name derived from a task id: leaves room below the 255 bytes most file
#: systems allow for what is appended to it (``.ledger.sqlite.outcome.json.<pid>``,
#: SQLite's ``-journal``)
MAX_FILE_NAME = 200
#: hexadecimal characters of the id's SHA-256 in a name that is not the id itself: two
#: ids with the same readable prefix share a name with odds of one in 2^48
HASH_CHARS = 12
#: between the readable prefix and the hash: a character no plain name holds, that
#: ``shlex.quote`` leaves alone (``~`` is quoted) and that batch systems read as itself
#: (SLURM expands ``%`` in ``--output``; some tools split on ``:`` and ``,``)
HASH_SEPARATOR = "@"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_=+-][A-Za-z0-9_.=+-]*")
_UNSAFE_CHARACTER = re.compile(r"[^A-Za-z0-9_.=+-]")


def safe_file_name(name: str) -> str:
    """The file (or folder) name that stands for task id ``name``: the one function that
    turns task ids into the names of ledgers, locks and worker log folders.

    An id that is safe as a name (letters, digits, ``_ . = + -``; not starting with
    ``.``; at most :data:`MAX_FILE_NAME` characters) is its own name, so the files of
    ordinary ids keep their names. Any other id gets a readable prefix (unsafe
    characters replaced by ``_``, cut to length) plus :data:`HASH_SEPARATOR` and
    :data:`HASH_CHARS` hexadecimal characters of the SHA-256 of the id: ``a/b`` becomes
    ``a_b@<hash>``, so it never shares a file with ``a_b`` (no plain name holds ``@``),
    and an id of any length gives a name the file system accepts. Every character of a
    name is one ``shlex.quote`` leaves alone, so a name filled into a command template
    (``--output={stdout}``) gains no quotes.
    """
    if len(name) <= MAX_FILE_NAME and _PLAIN_NAME.fullmatch(name):
        return name
    import hashlib  # here: ordinary ids need none of it

    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]
    readable = _UNSAFE_CHARACTER.sub("_", name)
    if readable.startswith("."):
        readable = "_" + readable  # no hidden files, no ".."
    return f"{readable[:MAX_FILE_NAME - HASH_CHARS - 1]}{HASH_SEPARATOR}{digest}"
