"""The wire vocabulary: stubs match the .proto, canonical JSON, signatures, credentials."""

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import auth, limits
from protocol.generate import OUTPUTS, ROOT, generate
from protocol.trust import TrustError, canonical_json, is_sha256, key_fingerprint, sha256_file, verify_signature


def test_committed_stubs_match_the_proto(tmp_path):
    """Regenerating from protocol/ddm.proto must give exactly the committed files."""
    produced = generate(tmp_path)
    for name, path in zip(OUTPUTS, produced, strict=True):
        assert path.read_bytes() == (ROOT / name).read_bytes(), f"{name} drifted: run python -m protocol.generate"


def test_drift_check_has_teeth(tmp_path):
    proto = (ROOT / "protocol" / "ddm.proto").read_text()
    changed = tmp_path / "protocol"
    changed.mkdir()
    (changed / "ddm.proto").write_text(proto.replace("string name = 2;", "string nickname = 2;"))
    from grpc_tools import protoc

    assert (
        protoc.main(["protoc", f"--proto_path={tmp_path}", f"--python_out={tmp_path}", str(changed / "ddm.proto")]) == 0
    )
    assert (changed / "ddm_pb2.py").read_bytes() != (ROOT / "protocol" / "ddm_pb2.py").read_bytes()


def test_canonical_json_is_stable_and_strict():
    a = canonical_json({"b": 1, "a": [1.5, "é"], "c": {"y": None, "x": True}})
    b = canonical_json({"c": {"x": True, "y": None}, "a": [1.5, "é"], "b": 1})
    assert a == b == '{"a":[1.5,"é"],"b":1,"c":{"x":true,"y":null}}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def keypair():
    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private, public


def test_signatures_verify_and_tampering_is_caught():
    private, public = keypair()
    data = canonical_json({"sha256": "ab" * 32, "expert_id": 1})
    signature = private.sign(data)
    verify_signature(public, data, signature, "entry")
    with pytest.raises(TrustError, match="entry"):
        verify_signature(public, data.replace(b'"expert_id":1', b'"expert_id":2'), signature, "entry")
    with pytest.raises(TrustError):
        verify_signature(keypair()[1], data, signature, "entry")
    with pytest.raises(TrustError):
        verify_signature(public, data, base64.b64decode(base64.b64encode(signature)[:-4] + b"AAAA"), "entry")
    with pytest.raises(TrustError):
        verify_signature(b"short", data, signature, "entry")


def test_fingerprints_and_hashes(tmp_path):
    _, public = keypair()
    fp = key_fingerprint(public)
    assert fp.startswith("sha256:") and is_sha256(fp[7:])
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert not is_sha256("AB" * 32) and not is_sha256("ab" * 31) and not is_sha256("../" * 21 + "a")


def test_bearer_credentials():
    ((key, value),) = auth.metadata("island1.s3cret")
    assert key == "authorization" and value == "Bearer island1.s3cret"
    assert auth.parse(value) == ("island1", "s3cret")
    for bad in (None, "", "island1.s3cret", "Bearer ", "Bearer island1", "Bearer .s", "Basic island1.s3cret"):
        assert auth.parse(bad) is None


def test_limits_hold_together():
    assert limits.MIN_CHUNK_BYTES == 1 << 20 and limits.MAX_CHUNK_BYTES == 4 << 20
    assert limits.MIN_CHUNK_BYTES <= limits.DEFAULT_CHUNK_BYTES <= limits.MAX_CHUNK_BYTES
    assert limits.MAX_MESSAGE_BYTES > limits.MAX_CHUNK_BYTES
    options = dict(limits.SERVER_OPTIONS)
    assert options["grpc.max_receive_message_length"] == limits.MAX_MESSAGE_BYTES
    assert limits.stream_deadline(100 << 20) > limits.stream_deadline(0) >= limits.STREAM_DEADLINE_FLOOR_S
