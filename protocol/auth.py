"""How a credential travels: gRPC metadata ``authorization: Bearer <island id>.<secret>``."""

from __future__ import annotations

METADATA_KEY = "authorization"
PREFIX = "Bearer "


def metadata(credential: str) -> tuple[tuple[str, str], ...]:
    return ((METADATA_KEY, PREFIX + credential),)


def parse(value: str | None) -> tuple[str, str] | None:
    """(island id, secret) from a metadata value, or None if it is not a bearer credential."""
    if not value or not value.startswith(PREFIX):
        return None
    island_id, dot, secret = value[len(PREFIX) :].partition(".")
    if not dot or not island_id or not secret:
        return None
    return island_id, secret
