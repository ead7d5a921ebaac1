"""Valid safetensors checkpoints whose ddm description is hostile JSON, through the real upload
path: nesting tens of thousands of levels deep, an integer of thousands of digits, a field of
the wrong type, text that is not valid Unicode.

Each must end at CompleteUpload as any refused checkpoint does (test_payloads.py): INVALID_ARGUMENT
with one line, the upload rejected in the registry, its staged bytes gone; never INTERNAL with
the upload left open for a retry that logs the same traceback again. A fault of the
coordinator's own, on the other hand, is not the island's: INTERNAL, the upload kept.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from grpc import StatusCode as S

from protocol import ddm_pb2 as pb

from .conftest import chunk
from .harness import check, registry_state
from .test_payloads import good, island, join, mark, refused_at_completion, split, uploaders  # noqa: F401


def with_description(checkpoint: bytes, edit) -> bytes:
    """The checkpoint with its description's JSON text edited as text: what json.dumps would
    never write."""
    header, body = split(checkpoint)
    text = header["__metadata__"]["ddm"]
    header["__metadata__"]["ddm"] = edit(text)
    assert header["__metadata__"]["ddm"] != text
    return join(header, body)


def deep_metrics(text: str) -> str:
    return text.replace('"metrics": {}', '"metrics": {"a": ' + "[" * 50_000 + "]" * 50_000 + "}")


def huge_steps(text: str) -> str:
    return text.replace(f'"steps": {json.loads(text)["steps"]}', '"steps": ' + "9" * 5000)


def kind_a_list(text: str) -> str:
    return text.replace('"kind": "expert"', '"kind": ["expert"]')


def lone_surrogate_in_metrics(text: str) -> str:
    return text.replace('"metrics": {}', '"metrics": {"note": "\\ud800"}')


HOSTILE = [
    (deep_metrics, "nested too deeply"),
    (huge_steps, "number too long"),
    (kind_a_list, "unknown model kind"),
    (lone_surrogate_in_metrics, "not valid Unicode"),
]


@pytest.mark.parametrize("edit, word", HOSTILE, ids=[edit.__name__ for edit, _ in HOSTILE])
def test_a_hostile_description_is_rejected(server, island, mark, good, edit, word):  # noqa: F811
    refused_at_completion(server, island, with_description(good, edit), mark, word)


# -- a gap in the checks, and a fault of the coordinator's own ------------------------------------


def raising(exc: BaseException):
    def check(*args, **kwargs):
        raise exc

    return check


@pytest.mark.parametrize("exc", [TypeError("unhashable"), RecursionError("too deep"), OverflowError("too big")])
def test_an_error_no_check_names_still_rejects_the_upload(server, island, mark, good, monkeypatch, exc):  # noqa: F811
    """Should the checks ever miss a kind of hostile content, it is rejected all the same."""
    for name in ("verify_checkpoint", "load_checkpoint"):
        monkeypatch.setattr(f"coordinator.validate.{name}", raising(exc))
    refused_at_completion(server, island, good, mark, "could not be checked", type(exc).__name__)


def test_a_fault_of_the_coordinator_is_internal_and_keeps_the_upload(server, island, good, monkeypatch):  # noqa: F811
    """A disk that fails to read is not the island's fault: INTERNAL, and the upload stays open
    with its bytes, to be completed again once the coordinator is repaired."""
    digest = hashlib.sha256(good).hexdigest()
    state = island.ok(
        "BeginUpload", pb.BeginUploadRequest(lease_id=island.lease.lease_id, size=len(good), sha256=digest)
    )
    assert island.ok("UploadChunks", [chunk(state.upload_id, 0, good)]).committed_offset == len(good)
    for name in ("verify_checkpoint", "load_checkpoint"):
        monkeypatch.setattr(f"coordinator.validate.{name}", raising(OSError(5, "Input/output error")))
    out = island.call("CompleteUpload", pb.CompleteUploadRequest(upload_id=state.upload_id))
    check(out, {S.INTERNAL: "internal error"}, "CompleteUpload on a failing disk")
    assert registry_state(server)["uploads"][state.upload_id]["state"] == "open"
    assert server.store.staging_path(state.upload_id).exists()
