"""The bounds on every request field: complete, of the right kind, and tight at their limits.

Every field of every message the coordinator accepts must have a bound in protocol/bounds.py;
a field added to ddm.proto without one fails here (and is refused at run time).
"""

import json
import math

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from protocol import bounds
from protocol import ddm_pb2 as pb
from protocol.bounds import BOUNDS, HEX, Blob, Flag, Int, Items, Nested, Real, Text, is_repeated
from protocol.limits import MAX_CHUNK_BYTES

REQUESTS = bounds.request_types()


def test_every_field_of_every_request_has_a_bound_of_its_kind():
    assert set(REQUESTS) <= set(BOUNDS), "a request message has no bounds"
    for name, message in REQUESTS.items():
        fields = {f.name: f for f in message.fields}
        assert set(BOUNDS[name]) == set(fields), f"{name}: bounds for {set(BOUNDS[name])}, fields {set(fields)}"
        for field_name, field in fields.items():
            bound = BOUNDS[name][field_name]
            assert bound.fits(field), f"{name}.{field_name}: {bound} does not fit a field of type {field.type}"
            assert isinstance(bound, Items) == is_repeated(field), f"{name}.{field_name}: repeated needs Items"


def _with_extra_field() -> type:
    """A HeartbeatRequest as a later protocol might have it: one more field, and no bound for it."""
    proto = descriptor_pb2.FileDescriptorProto(name="later.proto", package="ddm.later", syntax="proto3")
    message = proto.message_type.add(name="HeartbeatRequest")
    for number, (name, kind) in enumerate(
        [
            ("lease_id", descriptor_pb2.FieldDescriptorProto.TYPE_STRING),
            ("step", descriptor_pb2.FieldDescriptorProto.TYPE_INT64),
            ("gpu_serial", descriptor_pb2.FieldDescriptorProto.TYPE_STRING),
        ],
        start=1,
    ):
        message.field.add(name=name, number=number, type=kind, label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("ddm.later.HeartbeatRequest"))


def test_a_field_without_a_bound_is_refused():
    later = _with_extra_field()
    assert bounds.check(later(lease_id="ab" * 8, step=1)) == (
        "HeartbeatRequest.gpu_serial has no bound; the coordinator accepts no field without one"
    )
    assert bounds.check(pb.Shard()) == "Shard is not a message the coordinator accepts"


def test_what_clients_send_is_within_bounds():
    chunk = b"\x01" * MAX_CHUNK_BYTES
    typical = [
        pb.EnrollRequest(token="ddm_" + "A" * 32, name="gpu-node-7.example.org"),
        pb.AcquireLeaseRequest(local_dataset="/data/digits.npz"),
        pb.HeartbeatRequest(lease_id="0123456789abcdef", step=0, loss=math.nan, images_per_second=0.0),
        pb.HeartbeatRequest(lease_id="0123456789abcdef", step=1200, loss=0.31, images_per_second=5321.5),
        pb.ReleaseLeaseRequest(lease_id="0123456789abcdef", reason="the local dataset does not match"),
        pb.BeginUploadRequest(lease_id="0123456789abcdef", size=3 * 2**30, sha256="ab" * 32),
        pb.UploadChunk(upload_id="0123456789abcdef", offset=2**33, data=chunk, sha256="cd" * 32),
        pb.QueryUploadRequest(upload_id="0123456789abcdef"),
        pb.CompleteUploadRequest(upload_id="0123456789abcdef"),
        pb.GetManifestRequest(),
        pb.DownloadRequest(sha256="ef" * 32, offset=2**35),
        pb.StatusRequest(),
    ]
    assert {m.DESCRIPTOR.name for m in typical} == set(REQUESTS)
    for message in typical:
        assert bounds.check(message) is None, message.DESCRIPTOR.name


def _edges(bound) -> tuple[list, list]:
    """(values at the bound's limits, values just past them)."""
    if isinstance(bound, Text):
        letter = bound.alphabet[0] if bound.alphabet else "a"
        past = [letter * (bound.max_chars + 1)]
        if bound.alphabet == HEX:
            past += ["A", "0123456789abcdeg", "../x"]
        return [letter * bound.max_chars, ""], past
    if isinstance(bound, Blob):
        return [b"\0" * bound.max_bytes], [b"\0" * (bound.max_bytes + 1)]
    if isinstance(bound, Int):
        return [bound.min, bound.max], [bound.min - 1, bound.max + 1]
    if isinstance(bound, Real):
        past = [math.inf, -math.inf, -1.0 if bound.min == 0 else bound.min * 2 - 1]
        if bound.max < 1e300:
            past.append(bound.max * 2)
        return [bound.min, bound.max] + ([math.nan] if bound.nan else []), past + ([] if bound.nan else [math.nan])
    raise AssertionError(f"no edges for {bound}")


CASES = [
    (message, field, bound)
    for message, fields in BOUNDS.items()
    for field, bound in fields.items()
    if not isinstance(bound, Flag | Nested | Items)
]


@pytest.mark.parametrize("message,field,bound", CASES, ids=[f"{m}.{f}" for m, f, _ in CASES])
def test_each_bound_holds_at_its_limit_and_refuses_past_it(message, field, bound):
    cls = getattr(pb, message)
    at, past = _edges(bound)
    for value in at:
        assert bounds.check(cls(**{field: value})) is None, (field, value)
    for value in past:
        reason = bounds.check(cls(**{field: value}))
        assert reason is not None, (field, value)
        assert reason.startswith(f"{message}.{field} "), reason
        assert "\n" not in reason and len(reason) < 200, reason  # one line, never the value itself
        if isinstance(value, (str, bytes)) and len(value) > 100:
            assert str(len(value) - 1) in reason, reason  # names the limit


def test_the_table_describes_itself_as_plain_data():
    table = json.loads(json.dumps(bounds.describe()))
    assert set(table) == set(REQUESTS)
    assert table["UploadChunk"]["data"] == {"kind": "bytes", "max_bytes": MAX_CHUNK_BYTES}
    assert table["HeartbeatRequest"]["loss"]["nan"] is True
    assert table["HeartbeatRequest"]["images_per_second"]["nan"] is False
    assert table["DownloadRequest"]["sha256"] == {"kind": "text", "max_chars": 64, "alphabet": HEX}
