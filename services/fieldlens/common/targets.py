"""gRPC targets resolved to every server behind them, the way gRPC's own resolvers read them.

A target for one logical backend may stand for several servers: on Kubernetes a headless
Service (`dns:///triton:8001`) resolves to one address per pod, and the local cluster names its
replicas in a list (`ipv4:127.0.0.1:8001,127.0.0.1:8011`). Writes that every replica must see
(loading nets, learning an example) go to each of them, so each must be known by address.

Forms (https://github.com/grpc/grpc/blob/master/doc/naming.md):
- `dns:[//authority/]host[:port]` and a plain `host:port`: every address the name resolves to;
- `ipv4:addr:port[,addr:port,...]`, `ipv6:[addr]:port[,...]`: the listed addresses;
- `unix:path`, `unix://abs-path`: that one socket.
"""

from __future__ import annotations

import ipaddress
import socket

from fieldlens.common.errors import InvalidInput, Unavailable


def servers(target: str, default_port: int | None = None) -> list[str]:
    """Every server behind `target` as `host:port` (`[v6]:port`), in resolver order, each once.

    Raises:
        InvalidInput: the target is malformed (no port, an unknown scheme).
        Unavailable: a DNS name does not resolve (now; it may later).
    """
    if target.startswith(("unix:", "unix-abstract:")):
        return [target]
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            listed = [a.strip() for a in target[len(scheme) :].split(",") if a.strip()]
            if not listed:
                raise InvalidInput(f"gRPC target {target!r} lists no address")
            parts = [_split(a, default_port, target) for a in listed]
            if scheme == "ipv6:":
                return _unique([f"[{h}]:{p}" for h, p in parts])
            return _unique([f"{h}:{p}" for h, p in parts])
    name = target
    if target.startswith("dns:"):
        name = target[len("dns:") :]
        if name.startswith("//"):  # dns://authority/host:port: the authority is a DNS server
            name = name[2:].partition("/")[2]
    elif "://" in target:
        raise InvalidInput(f"gRPC target {target!r}: unknown scheme")
    host, port = _split(name, default_port, target)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Unavailable(f"gRPC target {target!r}: {host} does not resolve ({exc})") from exc
    return _unique(
        [f"[{i[4][0]}]:{port}" if i[0] == socket.AF_INET6 else f"{i[4][0]}:{port}" for i in infos]
    )


def dns_name(target: str) -> str | None:
    """The DNS name a `dns:` or `host:port` target resolves (what a server's certificate names:
    a caller that dials the addresses behind it checks TLS against this name); None for address
    lists, sockets and IP literals."""
    if target.startswith(("unix:", "unix-abstract:", "ipv4:", "ipv6:")):
        return None
    name = target.removeprefix("dns:")
    if name.startswith("//"):
        name = name[2:].partition("/")[2]
    host = name.rpartition(":")[0] if not name.startswith("[") else ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host or None
    return None


def _split(hostport: str, default_port: int | None, target: str) -> tuple[str, int]:
    if hostport.startswith("["):  # [v6]:port
        host, _, rest = hostport[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port = hostport.rpartition(":")
        if not sep:
            host, port = hostport, ""
    if not port:
        if default_port is None:
            raise InvalidInput(f"gRPC target {target!r} has no port")
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"gRPC target {target!r}: bad port {port!r}")
    if not host:
        raise InvalidInput(f"gRPC target {target!r} has no host")
    return host, int(port)


def _unique(addrs: list[str]) -> list[str]:
    return list(dict.fromkeys(addrs))
