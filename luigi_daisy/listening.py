"""The block server's listening sockets, made with the ``socket`` module alone.

A run binds its port before it imports tornado and asyncio, so that it can start its
workers first and build the server while they boot (a fresh worker takes tens of
milliseconds to reach its first block); the server then adopts the sockets
(``TCPServer.add_sockets``). Connections that arrive in between wait in the listen
backlog.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

#: connections the kernel queues before the server accepts them (tornado's default)
BACKLOG = 128


def is_loopback(host: str) -> bool:
    """Whether ``host`` names a loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_listening_sockets(host: str | None, port: int = 0,
                           backlog: int = BACKLOG) -> list[socket.socket]:
    """Listening, non-blocking TCP sockets on every address of ``host`` (every
    interface when None or ``""``), all on one port: ``port``, or a free one when 0.

    Does what ``tornado.netutil.bind_sockets`` does on Linux and macOS (the same
    addresses, ``SO_REUSEADDR``, IPv6 sockets ``IPV6_V6ONLY``, an unusable ``::1`` of
    ``localhost`` skipped) without importing tornado.
    """
    if host == "":
        host = None
    family = socket.AF_UNSPEC if socket.has_ipv6 else socket.AF_INET
    # an ASCII name as bytes: getaddrinfo would import the idna codec to encode a str
    lookup = host.encode("ascii") if host is not None and host.isascii() else host
    sockets: list[socket.socket] = []
    bound_port = None
    seen = set()
    try:
        for found in sorted(socket.getaddrinfo(lookup, port, family, socket.SOCK_STREAM, 0,
                                               socket.AI_PASSIVE), key=lambda entry: entry[0]):
            if found in seen:
                continue
            seen.add(found)
            address_family, kind, protocol, _, address = found
            if (address_family == socket.AF_INET6 and host == "localhost"
                    and address[3] != 0):
                continue  # macOS's link-local fe80::1%lo0 of localhost
            try:
                sock = socket.socket(address_family, kind, protocol)
            except OSError as error:
                if error.errno == errno.EAFNOSUPPORT:
                    continue
                raise
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            except OSError as error:
                if error.errno != errno.ENOPROTOOPT:
                    sock.close()
                    raise
            if address_family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if address[1] == 0 and bound_port is not None:  # one port for all addresses
                address = (address[0], bound_port, *address[2:])
            sock.setblocking(False)
            try:
                sock.bind(address)
            except OSError as error:
                sock.close()
                if (error.errno == errno.EADDRNOTAVAIL and host == "localhost"
                        and address[0] == "::1"):
                    continue  # IPv6 half disabled (docker's default)
                # the same class (errno), naming the address that could not be bound
                raise OSError(error.errno, error.strerror, address[0]) from None
            bound_port = sock.getsockname()[1]
            sock.listen(backlog)
            sockets.append(sock)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
