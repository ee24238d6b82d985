"""A run's live state over HTTP: ``/`` (a small HTML page) and ``/state.json``.

Luigi tasks set it as their tracking URL, so the luigid UI links to it.
"""

from __future__ import annotations

import html
import json
import time
from typing import TYPE_CHECKING

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

if TYPE_CHECKING:  # pragma: no cover
    from .run import WorkerRun


def run_state(run: WorkerRun) -> dict:
    """Plain-data snapshot of a run: per task counters, rate and who runs it."""
    elapsed = max(time.monotonic() - run.started_at, 1e-9)
    tasks = {}
    for task_id, state in run.scheduler.task_states.items():
        processed = state.completed_count - state.skipped_count + state.failed_count
        tasks[task_id] = {
            "total": state.total_block_count,
            "completed": state.completed_count,
            "skipped": state.skipped_count,
            "failed": state.failed_count,
            "orphaned": state.orphaned_count,
            "processing": state.processing_count,
            "ready": state.ready_count,
            "pending": state.pending_count,
            "blocks_per_second": round(processed / elapsed, 2),
            "workers": len(run.workers.get(task_id, ())),
            "followed": task_id in run.followed,
        }
    return {"elapsed_seconds": round(elapsed, 3), "tasks": tasks}


class _StateHandler(tornado.web.RequestHandler):
    def initialize(self, run: WorkerRun) -> None:
        self.run = run

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(run_state(self.run)))


class _PageHandler(_StateHandler):
    def get(self) -> None:
        state = run_state(self.run)
        rows = "".join(
            f"<tr><td>{html.escape(task_id)}</td><td>{task['completed']}</td>"
            f"<td>{task['skipped']}</td><td>{task['failed']}</td><td>{task['orphaned']}</td>"
            f"<td>{task['processing']}</td><td>{task['total']}</td>"
            f"<td>{task['blocks_per_second']}</td><td>{task['workers']}</td></tr>"
            for task_id, task in state["tasks"].items())
        self.write(
            "<!doctype html><html><head><meta http-equiv='refresh' content='2'>"
            "<title>luigi_daisy run</title></head><body><h1>luigi_daisy run</h1>"
            f"<p>running for {state['elapsed_seconds']} s</p><table border='1'>"
            "<tr><th>task</th><th>completed</th><th>skipped</th><th>failed</th>"
            "<th>orphaned</th><th>processing</th><th>total</th><th>blocks/s</th>"
            f"<th>workers</th></tr>{rows}</table>"
            "<p><a href='state.json'>state.json</a></p></body></html>")


class TrackingPage:
    """Serves a run's state while it runs."""

    def __init__(self, run: WorkerRun) -> None:
        self.run = run
        self.url: str | None = None
        self._server: HTTPServer | None = None

    def start(self, host: str) -> str:
        """Listen on a free port of ``host`` and return the page's URL."""
        application = tornado.web.Application([
            (r"/", _PageHandler, {"run": self.run}),
            (r"/state.json", _StateHandler, {"run": self.run}),
        ])
        self._server = HTTPServer(application)
        sockets = bind_sockets(0, address=host)
        self._server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        self.url = f"http://{host}:{port}/"
        return self.url

    def sockets(self) -> list:
        """The page's listening sockets (a forked worker closes them)."""
        return list(self._server._sockets.values()) if self._server is not None else []

    def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.stop()
