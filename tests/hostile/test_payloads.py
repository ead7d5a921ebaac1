"""Malicious checkpoints through the real upload path: pickles and torch's zip format (with a
payload that would leave a mark if anything ever ran it), and safetensors files whose header
lies about offsets, sizes, dtypes or shapes, or is not UTF-8, not JSON, or repeats keys.

Each one must end at CompleteUpload in INVALID_ARGUMENT with a one-line reason, leave the
expert unsigned, add nothing to the artifact store, and change nothing in the registry but
the refused upload's own row (which records why).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from grpc import StatusCode as S

from ddm_model.checkpoint import save_checkpoint, verify_checkpoint
from ddm_model.dit import DiT, DiTConfig
from protocol import ddm_pb2 as pb
from protocol.limits import MiB

from .conftest import chunk, enroll
from .harness import assert_changes_within, check, diff, registry_state, tree


class Mark:
    """Unpickling this creates a folder: the proof that something ran a pickle."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (str(self.path),)


@pytest.fixture(scope="module")
def uploaders() -> list:
    return []


@pytest.fixture
def island(server, uploaders):
    """This module's uploading island; a new one, with a new lease, should a checkpoint have
    been accepted: one wrongly signed payload fails its own test, not every test after it."""
    if not uploaders or server.registry.lease(uploaders[-1].lease.lease_id).state != "active":
        uploaders.append(enroll(server, lease=True, name="uploader"))
    return uploaders[-1]


@pytest.fixture(scope="module")
def mark(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pickle-mark") / "PICKLE-RAN"


@pytest.fixture
def good(island, server, tmp_path) -> bytes:
    """A well-formed checkpoint for the island's lease (untrained weights): the base the lies
    are told about. It passes every structural check, so each refusal below is the lie's."""
    lease = island.lease
    path = tmp_path / "expert.safetensors"
    model = DiT(DiTConfig.from_dict(json.loads(lease.model_config_json)))
    steps = json.loads(lease.train_config_json)["steps"]
    save_checkpoint(path, model, cluster_id=lease.cluster_id, steps=steps, data_fingerprint=lease.shard_fingerprint)
    verify_checkpoint(path, expect_kind="expert", expect_config=server.config.model)
    return path.read_bytes()


def refused_at_completion(server, island, data: bytes, mark: Path, *words: str) -> str:
    """Upload ``data`` through BeginUpload and UploadChunks, then CompleteUpload must refuse it."""
    digest = hashlib.sha256(data).hexdigest()
    state = island.ok(
        "BeginUpload", pb.BeginUploadRequest(lease_id=island.lease.lease_id, size=len(data), sha256=digest)
    )
    chunks = [chunk(state.upload_id, at, data[at : at + MiB]) for at in range(0, len(data), MiB)]
    assert island.ok("UploadChunks", chunks).committed_offset == len(data)
    artifacts = tree(server.store.artifacts)
    before = registry_state(server)
    out = island.call("CompleteUpload", pb.CompleteUploadRequest(upload_id=state.upload_id))
    check(out, {S.INVALID_ARGUMENT: "rejected"}, "CompleteUpload")
    for word in words:
        assert word in out.details, out.details
    upload_row = {("uploads", state.upload_id, c) for c in ("state", "reason", "updated_at")}
    assert_changes_within(diff(before, registry_state(server)), upload_row, "a refused checkpoint")
    assert registry_state(server)["uploads"][state.upload_id]["state"] == "rejected"
    assert server.registry.expert(island.lease.expert_id).state != "signed"
    assert tree(server.store.artifacts) == artifacts, "a refused checkpoint reached the store"
    assert not server.store.staging_path(state.upload_id).exists(), "a refused checkpoint stayed in staging"
    assert not mark.exists(), "the coordinator ran a pickle"
    return out.details


# -- pickles and zips ---------------------------------------------------------------------------


def state_dict_with(mark: Path) -> dict:
    return {"out.weight": torch.zeros(2), "payload": Mark(mark)}


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_a_pickle_is_refused_unopened(server, island, mark, protocol):
    data = pickle.dumps(state_dict_with(mark), protocol=protocol)
    refused_at_completion(server, island, data, mark, "not a safetensors file" if protocol == 0 else "pickle")


def test_a_torch_save_zip_is_refused_unopened(server, island, mark):
    buffer = io.BytesIO()
    torch.save(state_dict_with(mark), buffer)  # torch's zip format: data.pkl inside
    assert buffer.getvalue()[:4] == b"PK\x03\x04"
    refused_at_completion(server, island, buffer.getvalue(), mark, "pickle or torch.save")


def test_a_zip_of_anything_is_refused(server, island, mark, good):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("expert.safetensors", good)
        archive.writestr("data.pkl", pickle.dumps(Mark(mark)))
    refused_at_completion(server, island, buffer.getvalue(), mark, "pickle or torch.save")


def split(data: bytes) -> tuple[dict, bytes]:
    """(header, tensor bytes) of a safetensors file."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict | bytes, body: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + body


def pickle_as_a_tensor(header, body, payload):
    """One more tensor: a byte array holding the pickle."""
    end = len(body)
    header["payload"] = {"dtype": "U8", "shape": [len(payload)], "data_offsets": [end, end + len(payload)]}
    return join(header, body + payload)


def pickle_as_the_body(header, body, payload):
    """The real header, followed by a pickle where the tensors should be."""
    return join(header, payload)


def pickle_as_metadata(header, body, payload):
    """A second metadata entry beside ddm's description."""
    header["__metadata__"]["torch"] = payload.decode("latin-1")
    return join(header, body)


def pickle_as_the_description(header, body, payload):
    """ddm's description entry replaced by the pickle."""
    header["__metadata__"]["ddm"] = payload.decode("latin-1")
    return join(header, body)


INSIDE = [pickle_as_a_tensor, pickle_as_the_body, pickle_as_metadata, pickle_as_the_description]


@pytest.mark.parametrize("carrier", INSIDE, ids=[c.__name__ for c in INSIDE])
def test_a_pickle_inside_a_valid_looking_safetensors_header_is_refused(server, island, mark, good, carrier):
    header, body = split(good)
    refused_at_completion(server, island, carrier(header, body, pickle.dumps(Mark(mark))), mark)


def test_a_safetensors_file_with_a_zip_appended_is_refused(server, island, mark, good):
    """A polyglot: zip readers find an archive at the end of a file that starts as safetensors."""
    buffer = io.BytesIO()
    torch.save(state_dict_with(mark), buffer)
    refused_at_completion(server, island, good + buffer.getvalue(), mark)


# -- safetensors headers that lie ---------------------------------------------------------------


def tensors(header: dict) -> list[str]:
    """Tensor names in file order."""
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"][0])


def edited(good: bytes, edit) -> bytes:
    header, body = split(good)
    result = edit(header, body)
    return result if isinstance(result, bytes) else join(header, body)


def same_size_pair(header: dict) -> tuple[str, str]:
    by_size: dict[int, list[str]] = {}
    for name in tensors(header):
        begin, end = header[name]["data_offsets"]
        by_size.setdefault(end - begin, []).append(name)
    return next(names[:2] for names in by_size.values() if len(names) >= 2)


def overlap(header, body):
    a, b = same_size_pair(header)
    header[b]["data_offsets"] = list(header[a]["data_offsets"])


def shifted(header, body):
    name = tensors(header)[0]
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 4, end + 4]


def past_the_end(header, body):
    name = tensors(header)[-1]
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end + 4096]


def negative(header, body):
    name = tensors(header)[0]
    header[name]["data_offsets"] = [-8, header[name]["data_offsets"][1]]


def reversed_offsets(header, body):
    name = tensors(header)[-1]
    header[name]["data_offsets"] = header[name]["data_offsets"][::-1]


def shape_too_big(header, body):
    name = tensors(header)[-1]
    header[name]["shape"] = [2 * header[name]["shape"][0], *header[name]["shape"][1:]]


def shape_overflow(header, body):
    header[tensors(header)[-1]]["shape"] = [2**62, 2**62]


def shape_negative(header, body):
    header[tensors(header)[-1]]["shape"] = [-1, 4]


def shape_many_dims(header, body):
    header[tensors(header)[-1]]["shape"] = [1] * 10_000


def dtype_wider(header, body):
    header[tensors(header)[-1]]["dtype"] = "F64"


def dtype_unknown(header, body):
    header[tensors(header)[-1]]["dtype"] = "PICKLE"


def path_like_name(header, body):
    name = tensors(header)[0]
    header["../../etc/passwd"] = header.pop(name)


def long_name(header, body):
    name = tensors(header)[0]
    header["x" * 200_000] = header.pop(name)


def multiline_name_and_bad_offsets(header, body):
    name = tensors(header)[0]
    entry = header.pop(name)
    entry["data_offsets"] = [entry["data_offsets"][0] + 4, entry["data_offsets"][1] + 4]
    header["line one\nline two\r\x1b[2J"] = entry


def multiline_metadata_key(header, body):
    header["__metadata__"]["note\nsigned: yes"] = "x" * 100_000


def huge_length(header, body):
    return join(header, body, length=2**63 - 1)


def length_past_the_file(header, body):
    raw = join(header, body)
    return join(header, body, length=len(raw))


def length_fifteen_mib(header, body):
    return join(header, body, length=15 * MiB)


def length_zero(header, body):
    return join(header, body, length=0)


def length_into_the_json(header, body):
    raw = json.dumps(header).encode()
    return join(raw, body, length=len(raw) // 2)


def not_utf8(header, body):
    raw = json.dumps(header).encode().replace(b'"__metadata__"', b'"__metadata\xff\xfe"')
    return join(raw, body)


def not_json(header, body):
    return join(b"{" + b"not json at all " * 8, body)


def json_array(header, body):
    return join(b"[" + json.dumps(header).encode() + b"]", body)


def duplicate_tensor_key(header, body):
    a, b = same_size_pair(header)
    raw = json.dumps(header).encode()
    twin = json.dumps({a: header[b]}).encode()[1:-1]  # "a": <b's entry>
    return join(raw[:-1] + b", " + twin + b"}", body)


def duplicate_metadata_key(header, body):
    meta = header["__metadata__"]
    description = json.loads(meta["ddm"])
    other = {"ddm": json.dumps({**description, "cluster_id": description["cluster_id"] + 1})}
    raw = json.dumps(header).encode()
    return join(raw[:-1] + b', "__metadata__": ' + json.dumps(other).encode() + b"}", body)


def metadata_not_strings(header, body):
    header["__metadata__"] = {"ddm": json.loads(header["__metadata__"]["ddm"])}


def trailing_bytes(header, body):
    return join(header, body + b"\0" * 64)


LIES = [
    overlap,
    shifted,
    past_the_end,
    negative,
    reversed_offsets,
    shape_too_big,
    shape_overflow,
    shape_negative,
    shape_many_dims,
    dtype_wider,
    dtype_unknown,
    path_like_name,
    long_name,
    multiline_name_and_bad_offsets,
    multiline_metadata_key,
    huge_length,
    length_past_the_file,
    length_fifteen_mib,
    length_zero,
    length_into_the_json,
    not_utf8,
    not_json,
    json_array,
    duplicate_tensor_key,
    duplicate_metadata_key,
    metadata_not_strings,
    trailing_bytes,
]


@pytest.mark.parametrize("lie", LIES, ids=[lie.__name__ for lie in LIES])
def test_a_safetensors_header_that_lies_is_refused(server, island, mark, good, lie):
    refused_at_completion(server, island, edited(good, lie), mark)
