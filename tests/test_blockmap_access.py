"""Who may read the block map, and what a client can make its run spend: against a real
gated run (``blockmap_run.py``) started the way the README tells users to start a run
across nodes, ``host="0.0.0.0"``.

Every request to the page, its files and its API proves the run's secret token (query
or cookie) and names this machine in its ``Host`` header; the page listens on loopback
unless ``block_map_host`` says otherwise; only bodiless GETs are served; connections are
capped and closed when silent.
"""

from __future__ import annotations

import http.client
import os
import socket
import time
import urllib.parse
from pathlib import Path

import pytest
from blockmap_helpers import GatedRun, wait_for
from blockmap_run import FAILURE

import luigi_daisy as daisy
from luigi_daisy.errors import ConfigError
from luigi_daisy.tracking import IDLE_CONNECTION_SECONDS, MAX_CONNECTIONS

pytestmark = pytest.mark.timeout(150)

SETTLE_DEADLINE = 60.0  # seconds until the ungated blocks have all finished
ANSWER_DEADLINE = 5.0   # seconds the page may take to answer or close a refused request
ROUTES = ("", "api/run", "api/blocks?task=smooth", "state.json", "static/blockmap.js",
          "static/blockmap.css", "no/such/page")
EXTRA_CONNECTIONS = 100  # opened beyond MAX_CONNECTIONS
LARGE_BODY = 90 * 1024 * 1024  # the Content-Length announced by the large POST


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    gated = GatedRun(tmp_path_factory.mktemp("blockmap_access"), "0.0.0.0")
    try:
        def settled():
            status, report, _ = gated.get("api/run")
            tasks = {task["task_id"]: task for task in report["tasks"]}
            return tasks["smooth"]["failed"] == 1 and tasks["tiles"]["done"] == 48
        wait_for(settled, SETTLE_DEADLINE, "the failed block and tiles' blocks")
        yield gated
    finally:
        exit_code = gated.stop()
    assert exit_code == 0, gated.stderr()


def port_of(run: GatedRun) -> int:
    return urllib.parse.urlsplit(run.url).port


def request(run: GatedRun, method: str, target: str, headers: dict | None = None,
            body: bytes | None = None) -> tuple[int, dict, bytes]:
    """``(status, headers, body)`` of one request to the block map on loopback."""
    connection = http.client.HTTPConnection("127.0.0.1", port_of(run), timeout=10)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on ``port`` (IPv4 and IPv6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                if width == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
                else:
                    words = bytes.fromhex(address)
                    raw = b"".join(words[i:i + 4][::-1] for i in range(0, 16, 4))
                    found.add(socket.inet_ntop(socket.AF_INET6, raw))
    return found


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def closed_by_peer(sock: socket.socket) -> bool:
    """True when the server closed ``sock`` (reset or end of stream), without waiting.

    The socket is made non-blocking first: a socket with a timeout polls for that long
    before its ``recv``, whatever the flags (and the idle close came just as it gave up)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


# --------------------------------------------------------------------------- binding
def test_with_host_0000_the_map_listens_on_loopback_and_its_url_says_so(run):
    assert run.url.startswith("http://127.0.0.1:"), run.url
    assert len(run.token) >= 32, run.url
    assert listening_addresses(port_of(run)) == {"127.0.0.1"}


# --------------------------------------------------------------------------- the token
@pytest.mark.parametrize("path", ROUTES)
def test_every_route_without_the_token_is_refused_403_and_tells_nothing(run, path):
    status, _, body = request(run, "GET", "/" + path)
    assert status == 403, (path, body)
    assert b"token" in body  # says what to do
    for secret in (b"synthetic failure", b"worker_", b"127.0.0.1:", run.token.encode()):
        assert secret not in body, (path, body)
    wrong = "x" * len(run.token)
    status, _, body = request(run, "GET", "/" + path + ("&" if "?" in path else "?")
                              + "token=" + wrong)
    assert status == 403, (path, body)


@pytest.mark.parametrize("path", ROUTES)
def test_every_route_with_the_token_answers(run, path):
    target = urllib.parse.urlsplit(run.address(path))
    status, _, body = request(run, "GET", f"{target.path}?{target.query}")
    assert status == (404 if path.startswith("no/") else 200), (path, body)


def test_the_page_opened_with_the_token_sets_a_strict_httponly_cookie_that_opens_the_api(run):
    status, headers, _ = request(run, "GET", f"/?token={run.token}")
    assert status == 200
    cookie = headers["Set-Cookie"]
    name, value = cookie.split(";")[0].split("=", 1)
    assert value == run.token
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= attributes, cookie
    assert headers["Referrer-Policy"] == "no-referrer"

    status, _, body = request(run, "GET", "/api/run", {"Cookie": f"{name}={value}"})
    assert status == 200 and FAILURE.encode() in body
    status, _, _ = request(run, "GET", "/static/blockmap.js", {"Cookie": f"{name}={value}"})
    assert status == 200
    status, _, _ = request(run, "GET", "/api/run", {"Cookie": f"{name}={'y' * len(value)}"})
    assert status == 403
    # the API answers with the token but sets no cookie (only the page does)
    status, headers, _ = request(run, "GET", f"/api/run?token={run.token}")
    assert status == 200 and "Set-Cookie" not in headers


# --------------------------------------------------------------------------- Host header
@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example",
                                  "localhost.evil.example:{port}"])
def test_a_host_header_naming_another_machine_is_refused_even_with_the_token(run, host):
    status, _, body = request(run, "GET", f"/api/run?token={run.token}",
                              {"Host": host.format(port=port_of(run))})
    assert status == 403, body
    assert b"host" in body and b"synthetic failure" not in body


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST",
                                  "[::1]:{port}", "127.0.0.1"])
def test_this_machines_loopback_names_are_served(run, host):
    status, _, body = request(run, "GET", f"/api/run?token={run.token}",
                              {"Host": host.format(port=port_of(run))})
    assert status == 200, body


# --------------------------------------------------------------------------- methods, bodies
@pytest.mark.parametrize("path", ["api/run", "static/blockmap.js"])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
def test_only_get_is_served(run, method, path):
    status, _, _ = request(run, method, f"/{path}?token={run.token}")
    assert status == 405


def test_a_large_body_is_refused_from_its_headers_and_costs_the_run_no_memory(run):
    """Three 90 MB POST bodies raised the run's memory from 44 MB to 314 MB: tornado
    read each whole before answering. Now the announced length is refused at once."""
    pid = run.process.pid
    before = rss_bytes(pid)
    for method in ("POST", "GET"):
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port_of(run)), timeout=10) as sock:
                sock.sendall(f"{method} /api/run?token={run.token} HTTP/1.1\r\n"
                             f"Host: 127.0.0.1\r\nContent-Length: {LARGE_BODY}\r\n\r\n".encode())
                chunk = b"\0" * (1 << 20)
                sent = 0
                sock.settimeout(ANSWER_DEADLINE)
                try:  # send the body until the server has closed the connection
                    while sent < LARGE_BODY:
                        sock.sendall(chunk)
                        sent += len(chunk)
                except (BrokenPipeError, ConnectionResetError, TimeoutError):
                    pass
                assert sent < LARGE_BODY, f"{method}: the server took the whole body"
    assert rss_bytes(pid) - before < 20 * 1024 * 1024
    status, _, _ = run.get("api/run")
    assert status == 200


# --------------------------------------------------------------------------- connections
def test_a_silent_connection_is_closed_after_the_idle_timeout(run):
    with socket.create_connection(("127.0.0.1", port_of(run)), timeout=10) as sock:
        started = time.monotonic()
        sock.settimeout(IDLE_CONNECTION_SECONDS + 10)
        assert sock.recv(1) == b""
        assert time.monotonic() - started < IDLE_CONNECTION_SECONDS + 5


def test_connections_beyond_the_cap_are_closed_at_once_and_the_run_keeps_its_descriptors(run):
    """600 idle connections plus one worker restart made a run die with ``OSError:
    [Errno 24] Too many open files``."""
    pid = run.process.pid
    before = open_fds(pid)
    sockets = []
    try:
        for _ in range(MAX_CONNECTIONS + EXTRA_CONNECTIONS):
            sockets.append(socket.create_connection(("127.0.0.1", port_of(run)), timeout=10))
        wait_for(lambda: sum(closed_by_peer(sock) for sock in sockets) >= EXTRA_CONNECTIONS,
                 ANSWER_DEADLINE, f"{EXTRA_CONNECTIONS} connections beyond the cap closed")
        # the run holds no more than the cap (workers may come and go by a few)
        assert open_fds(pid) - before <= MAX_CONNECTIONS + 4
    finally:
        for sock in sockets:
            sock.close()
    # the silent ones are closed too, and the page answers again
    wait_for(lambda: open_fds(pid) - before <= 4, IDLE_CONNECTION_SECONDS + 10,
             "the run's descriptors back to what they were")
    status, _, _ = run.get("api/run")
    assert status == 200


# --------------------------------------------------------------------------- block_map_host
def test_block_map_host_0000_serves_every_interface_under_this_machines_name(tmp_path):
    """Its own key opens the map to the network (the block server stays on loopback);
    the URL names this machine, whose name the Host check accepts."""
    gated = GatedRun(tmp_path, "127.0.0.1", "0.0.0.0")
    try:
        parts = urllib.parse.urlsplit(gated.url)
        assert parts.hostname == socket.gethostname().lower(), gated.url
        assert listening_addresses(parts.port) == {"0.0.0.0"}
        for host in (socket.gethostname(), f"{socket.gethostname()}:{parts.port}"):
            status, _, body = request(gated, "GET", f"/api/run?token={gated.token}",
                                      {"Host": host})
            assert status == 200, (host, body)
        status, _, _ = request(gated, "GET", f"/api/run?token={gated.token}",
                               {"Host": "evil.example"})
        assert status == 403
        status, _, _ = request(gated, "GET", "/api/run")
        assert status == 403
    finally:
        exit_code = gated.stop()
    assert exit_code == 0, gated.stderr()


def test_a_block_map_host_that_is_not_this_machines_is_refused_naming_the_key(tmp_path):
    block = daisy.Roi((0,), (10,))
    task = daisy.Task("one", block, block, block, lambda block: None, num_workers=1)
    with pytest.raises(ConfigError, match=r"block_map_host='no\.such\.host\.invalid'.*"
                                          r"127\.0\.0\.1"):
        daisy.run_blockwise([task], progress=False, log_dir=tmp_path / "logs", tracking=True,
                            block_map_host="no.such.host.invalid")
