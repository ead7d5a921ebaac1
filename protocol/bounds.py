"""Bounds on every field of every request the coordinator accepts.

``BOUNDS`` maps each request message (by name) to a bound per field: the longest string, the
largest bytes value, the range of a number, the most items of a repeated field. ``check``
walks a message's descriptor, not this table, so a field added to ddm.proto without a bound is
refused at run time and fails the test that holds every field to a bound. The coordinator's
interceptor checks every request (each message of a stream too) before the service sees it
and answers INVALID_ARGUMENT with ``check``'s one line.

    check(pb.HeartbeatRequest(step=-1))  # "HeartbeatRequest.step must be 0 to 1000000000, got -1"
    describe()                            # the table as plain JSON-able data

The numbers come from protocol/limits.py.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from . import ddm_pb2
from .limits import (
    MAX_ARTIFACT_BYTES,
    MAX_CHECKPOINT_BYTES,
    MAX_CHUNK_BYTES,
    MAX_ID_CHARS,
    MAX_IMAGES_PER_SECOND,
    MAX_NAME_CHARS,
    MAX_PATH_CHARS,
    MAX_REASON_CHARS,
    MAX_STEPS,
    MAX_TOKEN_CHARS,
)

HEX = "0123456789abcdef"


def is_repeated(field: FieldDescriptor) -> bool:
    """Whether ``field`` is repeated, under every protobuf runtime ddm supports (5.29 has only
    ``label``; 7.x has only ``is_repeated``)."""
    flag = getattr(field, "is_repeated", None)
    return flag if flag is not None else field.label == FieldDescriptor.LABEL_REPEATED

_INTS = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
}
_REALS = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}


@dataclass(frozen=True)
class Text:
    """A string of at most ``max_chars`` characters, drawn from ``alphabet`` if one is given."""

    max_chars: int
    alphabet: str | None = None

    def fits(self, field: FieldDescriptor) -> bool:
        return field.type == FieldDescriptor.TYPE_STRING

    def problem(self, value: str) -> str | None:
        if len(value) > self.max_chars:
            return f"is {len(value)} characters long; at most {self.max_chars} are accepted"
        if self.alphabet is not None and not set(value) <= set(self.alphabet):
            return "must be lowercase hex" if self.alphabet == HEX else f"may hold only {self.alphabet!r}"
        return None

    def describe(self) -> dict:
        return {"kind": "text", "max_chars": self.max_chars, "alphabet": self.alphabet}


@dataclass(frozen=True)
class Blob:
    """A bytes value of at most ``max_bytes``."""

    max_bytes: int

    def fits(self, field: FieldDescriptor) -> bool:
        return field.type == FieldDescriptor.TYPE_BYTES

    def problem(self, value: bytes) -> str | None:
        if len(value) > self.max_bytes:
            return f"is {len(value)} bytes long; at most {self.max_bytes} are accepted"
        return None

    def describe(self) -> dict:
        return {"kind": "bytes", "max_bytes": self.max_bytes}


@dataclass(frozen=True)
class Int:
    """An integer from ``min`` to ``max``, both included."""

    min: int
    max: int

    def fits(self, field: FieldDescriptor) -> bool:
        return field.type in _INTS

    def problem(self, value: int) -> str | None:
        if not self.min <= value <= self.max:
            return f"must be {self.min} to {self.max}, got {value}"
        return None

    def describe(self) -> dict:
        return {"kind": "int", "min": self.min, "max": self.max}


@dataclass(frozen=True)
class Real:
    """A finite number from ``min`` to ``max``; NaN too where ``nan`` says it means "none yet"."""

    min: float
    max: float
    nan: bool = False

    def fits(self, field: FieldDescriptor) -> bool:
        return field.type in _REALS

    def problem(self, value: float) -> str | None:
        if math.isnan(value):
            return None if self.nan else "must be a number, got NaN"
        if math.isinf(value):
            return f"must be finite, got {value!r}"
        if not self.min <= value <= self.max:
            return f"must be {self.min:g} to {self.max:g}, got {value!r}"
        return None

    def describe(self) -> dict:
        return {"kind": "real", "min": self.min, "max": self.max, "nan": self.nan}


@dataclass(frozen=True)
class Flag:
    """A bool: any value is in bounds."""

    def fits(self, field: FieldDescriptor) -> bool:
        return field.type == FieldDescriptor.TYPE_BOOL

    def problem(self, value: bool) -> str | None:
        return None

    def describe(self) -> dict:
        return {"kind": "bool"}


@dataclass(frozen=True)
class Nested:
    """A message field: its own message's bounds apply (it needs an entry in ``BOUNDS``)."""

    def fits(self, field: FieldDescriptor) -> bool:
        return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.name in BOUNDS

    def problem(self, value: Message) -> str | None:
        inner = _problem(value)
        return None if inner is None else f"-> {inner}"

    def describe(self) -> dict:
        return {"kind": "message"}


@dataclass(frozen=True)
class Items:
    """A repeated field of at most ``max_count`` items, each within ``item``."""

    max_count: int
    item: Text | Blob | Int | Real | Flag | Nested

    def fits(self, field: FieldDescriptor) -> bool:
        return self.item.fits(field)

    def problem(self, values) -> str | None:
        if len(values) > self.max_count:
            return f"has {len(values)} items; at most {self.max_count} are accepted"
        for i, value in enumerate(values):
            problem = self.item.problem(value)
            if problem is not None:
                return f"item {i} {problem}"
        return None

    def describe(self) -> dict:
        return {"kind": "repeated", "max_count": self.max_count, "item": self.item.describe()}


Bound = Text | Blob | Int | Real | Flag | Nested | Items

ID = Text(MAX_ID_CHARS, HEX)
SHA256 = Text(64, HEX)

# Every request message of the Coordinator service (and any message nested in one), field by field.
BOUNDS: dict[str, dict[str, Bound]] = {
    "EnrollRequest": {"token": Text(MAX_TOKEN_CHARS), "name": Text(MAX_NAME_CHARS)},
    "AcquireLeaseRequest": {"local_dataset": Text(MAX_PATH_CHARS)},
    "HeartbeatRequest": {
        "lease_id": ID,
        "step": Int(0, MAX_STEPS),
        # NaN until the first log window has a mean loss; the loss is a mean square, never negative.
        "loss": Real(0.0, sys.float_info.max, nan=True),
        "images_per_second": Real(0.0, MAX_IMAGES_PER_SECOND),
    },
    "ReleaseLeaseRequest": {"lease_id": ID, "reason": Text(MAX_REASON_CHARS)},
    "BeginUploadRequest": {"lease_id": ID, "size": Int(0, MAX_CHECKPOINT_BYTES), "sha256": SHA256},
    "UploadChunk": {
        "upload_id": ID,
        "offset": Int(0, MAX_CHECKPOINT_BYTES),
        "data": Blob(MAX_CHUNK_BYTES),
        "sha256": SHA256,
    },
    "QueryUploadRequest": {"upload_id": ID},
    "CompleteUploadRequest": {"upload_id": ID},
    "GetManifestRequest": {},
    "DownloadRequest": {"sha256": SHA256, "offset": Int(0, MAX_ARTIFACT_BYTES)},
    "StatusRequest": {},
}


def request_types() -> dict[str, Descriptor]:
    """Every message the Coordinator service accepts, by name, with the messages nested in them."""
    found: dict[str, Descriptor] = {}
    pending = [m.input_type for m in ddm_pb2.DESCRIPTOR.services_by_name["Coordinator"].methods]
    while pending:
        message = pending.pop()
        if message.name in found:
            continue
        found[message.name] = message
        pending.extend(f.message_type for f in message.fields if f.message_type is not None)
    return found


def _problem(message: Message) -> str | None:
    descriptor = message.DESCRIPTOR
    table = BOUNDS.get(descriptor.name)
    if table is None:
        return f"{descriptor.name} is not a message the coordinator accepts"
    for field in descriptor.fields:
        bound = table.get(field.name)
        if bound is None:
            return f"{descriptor.name}.{field.name} has no bound; the coordinator accepts no field without one"
        if field.type == FieldDescriptor.TYPE_MESSAGE and not is_repeated(field) and not message.HasField(field.name):
            continue
        problem = bound.problem(getattr(message, field.name))
        if problem is not None:
            return f"{descriptor.name}.{field.name} {problem}"
    return None


def check(message: Message) -> str | None:
    """Why ``message`` is out of bounds, in one line naming the field and the bound; None if it is not."""
    return _problem(message)


def describe() -> dict[str, dict[str, dict]]:
    """The table as plain data: {message: {field: {"kind": ..., limits...}}}."""
    return {message: {name: bound.describe() for name, bound in fields.items()} for message, fields in BOUNDS.items()}
