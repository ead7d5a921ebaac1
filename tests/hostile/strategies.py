"""Hypothesis strategies for hostile field values: random, huge, unicode, empty and path-like
strings; negative, huge, NaN and infinite numbers; random and huge bytes; undecodable messages."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from protocol.limits import MAX_MESSAGE_BYTES, MiB

# Reproducible in CI: examples derive from each test's source, no example database. No
# shrinking: each failure message names the call in full, and a shrink of calls that carry
# megabytes would take minutes.
FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

PATHLIKE = (
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    ".",
    "../ddm.db",
    "../signing_key.pem",
    "../config.json",
    "staging/../../escape",
    "a\x00b",
    "\x00",
    "..\\..\\windows\\system32",
    "C:\\Windows",
    "%2e%2e%2fetc%2fpasswd",
    "~/.ssh/id_ed25519",
    "/dev/zero",
    "/proc/self/environ",
    "../" + "a" * 61,
    "A" * 64,
    "0" * 64 + "/",
)
ODD = ("", " ", "\n", "\r\n", "\t", "\x00", "\x7f", "\u202e", "\ufeff", "é", "\U0001d54f", "😀")


class Huge:
    """A long value, drawn as (unit, count) so that hypothesis' reports stay short; a test
    turns it into the value with ``real``."""

    def __init__(self, unit: str | bytes, count: int):
        self.unit, self.count = unit, count

    def __repr__(self) -> str:
        return f"{self.unit!r} * {self.count}"

    @property
    def value(self) -> str | bytes:
        return self.unit * self.count


class Blob:
    """Bytes with a short repr."""

    def __init__(self, value: bytes):
        self.value = value

    def __repr__(self) -> str:
        head = repr(self.value[:24])
        return head if len(self.value) <= 24 else f"{head}...({len(self.value)} bytes)"


def real(value):
    """The value a strategy stands for (a Huge or a Blob becomes its string or bytes)."""
    return value.value if isinstance(value, (Huge, Blob)) else value


# Longer than any field needs, up to past the server's message limit.
HUGE_LENGTHS = (257, 4097, 100_000, 1_000_000, MAX_MESSAGE_BYTES + 1)


def huge_strings():
    return st.builds(
        lambda ch, n: Huge(ch, n // len(ch.encode())), st.sampled_from("a\x00é😀\n"), st.sampled_from(HUGE_LENGTHS)
    )


def strings(max_size: int = 40):
    """Any string the wire can carry (valid UTF-8)."""
    return st.one_of(
        st.text(st.characters(exclude_categories=("Cs",)), max_size=max_size),
        st.sampled_from(PATHLIKE),
        st.sampled_from(ODD),
        huge_strings(),
    )


def ids():
    """Strings in an id field: anything, and well-formed ids that name nothing."""
    return st.one_of(strings(), st.text("0123456789abcdef", min_size=16, max_size=16))


def sha256s():
    return st.one_of(strings(), st.text("0123456789abcdef", min_size=64, max_size=64))


INT64 = (0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, -(2**63), -(2**31))


def int64s():
    return st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from(INT64))


def doubles():
    specials = (math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308, -1.0, 1e300)
    return st.one_of(st.floats(), st.sampled_from(specials))


def blobs(max_size: int = 256):
    big = st.builds(lambda n: Huge(b"\xa5", n), st.sampled_from((MiB - 1, 4 * MiB + 1, MAX_MESSAGE_BYTES + 1)))
    return st.one_of(st.binary(max_size=max_size), big)


def undecodable(message_type):
    """Bytes that do not parse as ``message_type``: bad wire types, truncated varints and
    lengths, strings that are not UTF-8, and random bytes."""
    tag = st.integers(1, 20)
    parts = st.one_of(
        st.builds(lambda f: bytes([(f << 3) | 7]), tag),  # wire type 7 does not exist
        st.builds(lambda f: bytes([(f << 3) | 0, 0x80]), tag),  # a varint that never ends
        st.builds(lambda f, n: bytes([(f << 3) | 2, n]) + b"x" * (n // 2), tag, st.integers(2, 127)),  # short
        st.builds(lambda f: bytes([(f << 3) | 2, 2, 0xFF, 0xFE]), st.integers(1, 5)),  # not UTF-8
        st.builds(lambda f: bytes([(f << 3) | 3]), tag),  # a group that never closes
        st.binary(min_size=1, max_size=64),
    )

    def parses(data: bytes) -> bool:
        try:
            message_type.FromString(data)
        except Exception:
            return False
        return True

    return st.builds(lambda a, b: a + b, st.binary(max_size=8), parts).filter(lambda data: not parses(data)).map(Blob)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def unknown_fields():
    """Well-formed protobuf bytes made only of fields the message does not define (numbers
    100 and up): every proto3 parser must accept and skip them, however large."""
    number = st.integers(100, 2**29 - 1)
    field = st.one_of(
        st.builds(lambda f, v: _varint(f << 3) + _varint(v), number, st.integers(0, 2**64 - 1)),
        st.builds(lambda f, b: _varint(f << 3 | 1) + b, number, st.binary(min_size=8, max_size=8)),
        st.builds(lambda f, b: _varint(f << 3 | 5) + b, number, st.binary(min_size=4, max_size=4)),
        st.builds(lambda f, b: _varint(f << 3 | 2) + _varint(len(real(b))) + real(b), number, blobs(64)),
    )
    return st.lists(field, max_size=4).map(lambda parts: Blob(b"".join(parts)))
