"""HOST:PORT addresses as both sides write them: ``127.0.0.1:50051``, ``[::1]:50051``,
``coordinator.example.org:50051``."""

from __future__ import annotations

import ipaddress


def split_address(address: str) -> tuple[str, int]:
    """(host without brackets, port); ValueError for anything that is not HOST:PORT."""
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{address!r} is not HOST:PORT (write an IPv6 address in brackets: [::1]:50051)")
    return host, int(port)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """Whether a host is this machine only: a loopback address, or the name localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
