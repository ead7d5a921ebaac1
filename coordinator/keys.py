"""The coordinator's Ed25519 signing key: created once at init (mode 0600), then only read."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ddm_model.errors import DDMError
from protocol.trust import canonical_json, key_fingerprint


class SigningKeyError(DDMError):
    """A signing key that is missing, unreadable or too widely readable."""


class SigningKey:
    def __init__(self, private: Ed25519PrivateKey):
        self._private = private
        self.public_bytes = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.fingerprint = key_fingerprint(self.public_bytes)

    @classmethod
    def create(cls, path: Path) -> SigningKey:
        private = Ed25519PrivateKey.generate()
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # O_EXCL: never overwrite a key; 0600 from the first byte written.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        return cls(private)

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        try:
            mode = path.stat().st_mode & 0o777
            data = path.read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"cannot read the signing key {path}: {exc.strerror}") from None
        if mode & 0o077:
            raise SigningKeyError(f"the signing key {path} is readable by others (mode {mode:o}); chmod 600 it")
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except ValueError as exc:
            raise SigningKeyError(f"{path} is not a PEM private key: {exc}") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise SigningKeyError(f"{path} is not an Ed25519 key")
        return cls(private)

    def sign(self, obj: object) -> tuple[bytes, bytes]:
        """(canonical JSON of obj, its signature)."""
        data = canonical_json(obj)
        return data, self._private.sign(data)
