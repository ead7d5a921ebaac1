"""Canonical JSON, key fingerprints and Ed25519 signature checks: what both sides agree on.

The coordinator signs canonical JSON (sorted keys, no spaces, UTF-8); anyone holding the
coordinator's public key verifies it. Fingerprints are ``sha256:<hex>`` of the raw 32-byte
public key (of a TLS certificate's DER encoding, for the channel), short enough to pin on a
command line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

# What the coordinator signs: one entry per expert checkpoint, and the ensemble manifest.
ENTRY_FORMAT = "ddm.expert-entry/1"
MANIFEST_FORMAT = "ddm.ensemble/1"


class TrustError(Exception):
    """A signature, hash or key that does not check out."""


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def key_fingerprint(public_key: bytes) -> str:
    return "sha256:" + hashlib.sha256(public_key).hexdigest()


def certificate_fingerprint(der: bytes) -> str:
    """The fingerprint of a TLS certificate: SHA-256 over its DER encoding."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def verify_signature(public_key: bytes, data: bytes, signature: bytes, what: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        raise TrustError(f"the signature of {what} does not verify against the coordinator's key") from None


def sha256_file(path: str | Path, chunk: int = 4 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)
