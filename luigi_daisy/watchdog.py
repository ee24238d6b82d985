"""A worker whose block server is gone exits on its own within ``worker_death_timeout``.

A SIGKILLed run cancels nothing: its cluster jobs would sit until their wall time. The
watchdog, a daemon thread of the worker process, ends the process when

- no connection to the server has been made within the timeout (unreachable at start),
- the server closed the connection (the run's process died: its kernel closes its
  sockets) while the worker is waiting for a block or busy with a long one, or
- the server's host vanished: TCP keepalive probes, tuned to the timeout, go unanswered.

``Client`` registers its socket with :func:`watch`; the worker entry point calls
:func:`start` with the timeout from its context.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import sys
import threading
import time

logger = logging.getLogger(__name__)

#: context key of the timeout (seconds)
CONTEXT_KEY = "worker_death_timeout"
#: default timeout (seconds)
DEFAULT_TIMEOUT = 60.0
#: exit code of a worker that gave up on its server
EXIT_SERVER_GONE = 69
#: seconds a worker whose server closed the connection gets to exit on its own
CLOSE_GRACE = 2.0

_HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL | getattr(select, "POLLRDHUP", 0)


class Watchdog:
    """Ends this process when its block server is gone (see the module's docstring).

    Parameters
    ----------
    timeout:
        Seconds after which a worker without a live server exits.
    exit:
        Called with the exit code to end the process (``os._exit``: user code may hold
        threads that would keep the process alive).
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, exit=os._exit) -> None:
        self.timeout = max(float(timeout), 1.0)
        self._exit = exit
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._ever_connected = False
        self._started_at = time.monotonic()
        self._hangup_since: float | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def start(self) -> Watchdog:
        """Start the watching thread."""
        self._thread = threading.Thread(target=self._loop, name="luigi_daisy-watchdog",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (the worker is exiting by itself)."""
        self._stopped.set()

    def watch(self, sock: socket.socket) -> None:
        """Watch a connection to the block server."""
        tune_keepalive(sock, self.timeout)
        with self._lock:
            self._sockets.add(sock)
            self._ever_connected = True
            self._hangup_since = None

    def unwatch(self, sock: socket.socket) -> None:
        """Stop watching a connection the worker closes itself."""
        with self._lock:
            self._sockets.discard(sock)

    # ------------------------------------------------------------------ thread
    def _loop(self) -> None:
        interval = min(1.0, self.timeout / 10)
        while not self._stopped.wait(interval):
            reason = self._check(time.monotonic())
            if reason is not None:
                self._give_up(reason)
                return

    def _check(self, now: float) -> str | None:
        """Why this worker should exit now, or None."""
        with self._lock:
            sockets = list(self._sockets)
            ever_connected = self._ever_connected
        if not ever_connected:
            if now - self._started_at > self.timeout:
                return (f"no connection to the block server within worker_death_timeout="
                        f"{self.timeout:g} s")
            return None
        if not sockets:
            return None
        if any(self._hung_up(sock) for sock in sockets):
            if self._hangup_since is None:
                self._hangup_since = now
            elif now - self._hangup_since >= min(CLOSE_GRACE, self.timeout):
                return "the block server closed the connection (the run is gone)"
        else:
            self._hangup_since = None
        return None

    def _hung_up(self, sock: socket.socket) -> bool:
        try:
            fd = sock.fileno()
        except OSError:
            return False
        if fd < 0:
            return False
        poller = select.poll()
        poller.register(fd, _HANGUP)
        try:
            events = poller.poll(0)
        except OSError:
            return False
        if any(event & select.POLLNVAL for _, event in events):
            return False  # closed by the worker in the meantime
        return bool(events)

    def _give_up(self, reason: str) -> None:
        message = f"luigi_daisy worker exits: {reason}\n"
        try:
            sys.stderr.write(message)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        self._exit(EXIT_SERVER_GONE)


def tune_keepalive(sock: socket.socket, timeout: float) -> None:
    """Probe an idle connection so a vanished peer host is noticed within ``timeout``."""
    idle = max(1, int(timeout / 3))
    interval = max(1, int(timeout / 6))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval),
                              ("TCP_KEEPCNT", 3)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
        if hasattr(socket, "TCP_USER_TIMEOUT"):  # data sent but never acknowledged
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(timeout * 1000))
    except OSError:
        pass


_current: Watchdog | None = None


def start(context) -> Watchdog:
    """Start this process's watchdog with the timeout from the worker's context."""
    global _current
    try:
        timeout = float(context.get(CONTEXT_KEY, DEFAULT_TIMEOUT))
    except (TypeError, ValueError):
        timeout = DEFAULT_TIMEOUT
    _current = Watchdog(timeout).start()
    return _current


def watch(sock: socket.socket) -> None:
    """Register a connection to the block server (nothing happens without a watchdog)."""
    if _current is not None:
        _current.watch(sock)


def unwatch(sock: socket.socket) -> None:
    """Unregister a connection the worker closes itself."""
    if _current is not None:
        _current.unwatch(sock)
