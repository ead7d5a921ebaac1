"""The island's state folder: its identity, pinned keys, data shards, training and outbox.

    STATE/identity.json        island id, credential, role, coordinator, its key and how to reach
                               it over TLS (mode 0600)
    STATE/known_keys.json      coordinator address -> pinned key fingerprint (trust on first use)
    STATE/shards/<sha256>      downloaded data shards
    STATE/work/expert-N/       resume state of the training run for expert N
    STATE/outbox/              finished checkpoints waiting to be uploaded (and, while one is
                               uploading, its upload's id: *.upload.json)
    STATE/signed/              checkpoints the coordinator has signed

Everything is written atomically, so a killed island restarts from a consistent folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ddm_model.fsutil import atomic_path

from .tls import TlsSettings

DEFAULT_STATE_DIR = Path.home() / ".ddm" / "island"


@dataclass
class Identity:
    coordinator: str
    island_id: str
    credential: str
    role: str
    public_key_hex: str
    key_fingerprint: str
    tls: dict | None = None  # TlsSettings.to_json() last used with this identity; absent in older files

    @property
    def public_key(self) -> bytes:
        return bytes.fromhex(self.public_key_hex)

    @property
    def tls_settings(self) -> TlsSettings | None:
        return TlsSettings.from_json(self.tls)


class IslandState:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def latents(self) -> Path:
        """A latent home's autoencoders and the latents of this island's data, cached."""
        return self.root / "latents"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def signed(self) -> Path:
        return self.root / "signed"

    def work(self, expert_id: int) -> Path:
        return self.root / "work" / f"expert-{expert_id}"

    def _read(self, name: str) -> dict | None:
        path = self.root / name
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def identity(self) -> Identity | None:
        data = self._read("identity.json")
        try:
            return Identity(**data) if data else None
        except TypeError:
            return None

    def save_identity(self, identity: Identity) -> None:
        with atomic_path(self.root / "identity.json", mode=0o600) as tmp:
            tmp.write_text(json.dumps(asdict(identity), indent=2))

    def remember_tls(self, identity: Identity, tls: TlsSettings) -> None:
        """Keep the TLS settings that just worked, so later commands need no TLS flags."""
        if identity.tls != tls.to_json():
            identity.tls = tls.to_json()
            self.save_identity(identity)

    def known_key(self, coordinator: str) -> str | None:
        return (self._read("known_keys.json") or {}).get(coordinator)

    def pinned_keys(self) -> set[str]:
        """Every key fingerprint this state folder trusts."""
        return set((self._read("known_keys.json") or {}).values())

    def remember_key(self, coordinator: str, fingerprint: str) -> None:
        keys = self._read("known_keys.json") or {}
        keys[coordinator] = fingerprint
        with atomic_path(self.root / "known_keys.json", mode=0o600) as tmp:
            tmp.write_text(json.dumps(keys, indent=2))
