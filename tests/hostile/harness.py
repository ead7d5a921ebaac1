"""The hostile-input suite's view of a coordinator: raw calls and what may change.

Calls go through the generated stub on a real channel, so a test can send any message,
including ones the client library would never build, and raw bytes that are not a message
at all. Every call has a deadline: a hang ends as DEADLINE_EXCEEDED, which no test allows.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import grpc

from protocol import auth
from protocol import ddm_pb2 as pb
from protocol.ddm_pb2_grpc import CoordinatorStub
from protocol.limits import MAX_MESSAGE_BYTES

OK = grpc.StatusCode.OK
DEADLINE_S = 20.0
# A refusal's details: one non-empty line, short enough to read in a log or a terminal.
MAX_DETAILS = 1024
SERVICE = "/ddm.v1.Coordinator/"
REQUEST = {
    "Enroll": pb.EnrollRequest,
    "AcquireLease": pb.AcquireLeaseRequest,
    "Heartbeat": pb.HeartbeatRequest,
    "ReleaseLease": pb.ReleaseLeaseRequest,
    "BeginUpload": pb.BeginUploadRequest,
    "UploadChunks": pb.UploadChunk,
    "QueryUpload": pb.QueryUploadRequest,
    "CompleteUpload": pb.CompleteUploadRequest,
    "GetManifest": pb.GetManifestRequest,
    "Download": pb.DownloadRequest,
    "Status": pb.StatusRequest,
}
STREAM_IN = {"UploadChunks"}
STREAM_OUT = {"Download"}

# Island columns that any authenticated call may change, refused or not: last_seen_at (the
# interceptor touches it when it authenticates a caller) and the traffic counters (it counts
# every message an island sends, refused ones included, and the reaper flushes them every
# second). bytes_received is NOT among them: it counts committed checkpoint bytes.
VOLATILE_ISLAND_COLUMNS = (
    "last_seen_at",
    "checkpoint_messages",
    "checkpoint_message_bytes",
    "heartbeats",
    "heartbeat_bytes",
    "control_messages",
    "control_bytes",
)
ROW_KEYS = {
    "islands": "id",
    "invites": "token_hash",
    "experts": "id",
    "leases": "id",
    "uploads": "id",
    "artifacts": "sha256",
    "ensembles": "id",
}


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    reply: object = None  # the reply message (a list of messages for Download)


class Wire:
    """A real channel and the generated stub, with an optional bearer credential."""

    def __init__(self, address: str, credential: str | None = None):
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", -1)]
        self.channel = grpc.insecure_channel(address, options=options)
        self.stub = CoordinatorStub(self.channel)
        self.metadata = auth.metadata(credential) if credential else ()

    def close(self) -> None:
        self.channel.close()

    def call(self, method: str, request, metadata=None) -> Outcome:
        """One RPC: ``request`` is a message, or a list of chunks for UploadChunks."""
        stub = getattr(self.stub, method)
        kwargs = {"metadata": self.metadata if metadata is None else metadata, "timeout": DEADLINE_S}
        try:
            if method in STREAM_IN:
                reply = stub(iter(request), **kwargs)
            elif method in STREAM_OUT:
                reply = list(stub(request, **kwargs))
            else:
                reply = stub(request, **kwargs)
        except grpc.RpcError as err:
            return Outcome(err.code(), err.details() or "")
        return Outcome(OK, "", reply)

    def raw(self, method: str, payload: bytes | list[bytes]) -> Outcome:
        """One RPC whose request is ``payload`` as is, on the wire, unparsed by this side."""
        path = SERVICE + method
        kwargs = {"metadata": self.metadata, "timeout": DEADLINE_S}
        try:
            if method in STREAM_IN:
                reply = self.channel.stream_unary(path)(iter(payload), **kwargs)
            elif method in STREAM_OUT:
                reply = list(self.channel.unary_stream(path)(payload, **kwargs))
            else:
                reply = self.channel.unary_unary(path)(payload, **kwargs)
        except grpc.RpcError as err:
            return Outcome(err.code(), err.details() or "")
        return Outcome(OK, "", reply)


class Island:
    """An enrolled identity and its channel (a plain class: hypothesis prints dataclasses field
    by field, and ``extra`` may hold megabytes)."""

    def __init__(self, island_id: str, credential: str, wire: Wire, lease: pb.Lease | None = None):
        self.id, self.credential, self.wire, self.lease = island_id, credential, wire, lease
        self.extra: dict = {}

    def __repr__(self) -> str:
        return f"Island({self.id})"

    def call(self, method: str, request) -> Outcome:
        return self.wire.call(method, request)

    def ok(self, method: str, request):
        """A call that must succeed; its reply."""
        outcome = self.call(method, request)
        assert outcome.code == OK, f"{method}: {outcome.code.name} {outcome.details}"
        return outcome.reply


def short(value) -> str:
    """A repr that stays readable for megabyte-long values."""
    text = repr(value)
    return text if len(text) <= 120 else f"{text[:80]}...({len(text)} chars)"


def check(outcome: Outcome, allowed: dict, what: str) -> None:
    """The call ended in an allowed status; a refusal says why in one short printable line.

    ``allowed`` maps each allowed status code to None or a word its details must contain."""
    names = sorted(code.name for code in allowed)
    assert outcome.code in allowed, f"{what}: got {outcome.code.name} {short(outcome.details)}; allowed {names}"
    if outcome.code == OK:
        return
    details = outcome.details
    assert details.strip(), f"{what}: {outcome.code.name} with empty details"
    assert "\n" not in details and "\r" not in details, f"{what}: details span lines: {short(details)}"
    controls = sorted({c for c in details if unicodedata.category(c) == "Cc"})
    assert not controls, f"{what}: details hold control characters {controls}: {short(details)}"
    assert len(details) <= MAX_DETAILS, f"{what}: details of {len(details)} chars: {short(details)}"
    word = allowed[outcome.code]
    if word is not None:
        assert word in details, f"{what}: {outcome.code.name} details lack {word!r}: {short(details)}"


# -- the registry and the disk ------------------------------------------------------------------


def registry_state(server) -> dict[str, dict]:
    """Every registry table as {row key: row}, without the volatile island columns."""
    state = {}
    for table, rows in server.registry.snapshot().items():
        key = ROW_KEYS[table]
        state[table] = {}
        for row in rows:
            if table == "islands":
                row = {c: v for c, v in row.items() if c not in VOLATILE_ISLAND_COLUMNS}
            state[table][row[key]] = row
    return state


def diff(before: dict, after: dict) -> list[tuple]:
    """(table, row key, column or '+row'/'-row', old, new) for everything that differs."""
    changes = []
    for table in sorted(set(before) | set(after)):
        old, new = before.get(table, {}), after.get(table, {})
        for key in old.keys() - new.keys():
            changes.append((table, key, "-row", old[key], None))
        for key in new.keys() - old.keys():
            changes.append((table, key, "+row", None, new[key]))
        for key in old.keys() & new.keys():
            for column in old[key]:
                if old[key][column] != new[key][column]:
                    changes.append((table, key, column, old[key][column], new[key][column]))
    return changes


def assert_unchanged(server, before: dict, what: str) -> None:
    changes = diff(before, registry_state(server))
    assert not changes, f"{what}: the registry changed: {short(changes)}"


def assert_changes_within(changes: list[tuple], allowed: set[tuple], what: str) -> None:
    """Every change is (table, key, column) in ``allowed``; a key of None allows any row."""
    stray = [c for c in changes if (c[0], c[1], c[2]) not in allowed and (c[0], None, c[2]) not in allowed]
    assert not stray, f"{what}: unexpected registry changes: {short(stray)}"


def tree(root: Path) -> set[str]:
    """Every path under ``root`` (relative), files and folders."""
    found = set()
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(folder, name), root))
    return found


def file_digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


ID_SHAPE = re.compile(r"[0-9a-f]{16}")


def id_shaped(value: str) -> bool:
    """What the coordinator's lease and upload ids look like."""
    return ID_SHAPE.fullmatch(value) is not None


def sha256_shaped(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)
