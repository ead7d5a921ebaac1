"""The ensemble manifest's members, read only after its signature checked out.

A manifest (signed as a whole) names the router, every expert (each with its own signed
entry, checked here again) and, once distilled, the dense student, each by sha256, size and
model config, and the experts' shares of the data (protocol/shares.py; absent in older
manifests, which then mean uniform shares). The client reads it to download and verify an
ensemble; the coordinator reads its own published manifest back the same way before distilling
from it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from .shares import SharesError, check_shares
from .trust import ENTRY_FORMAT, MANIFEST_FORMAT, TrustError, canonical_json, is_sha256, verify_signature


@dataclass
class Member:
    name: str  # file name in a downloaded ensemble folder
    kind: str  # "router", "expert" or "student": the checkpoint kind the file must hold
    sha256: str
    size: int
    config: dict


def members(manifest: dict, public_key: bytes) -> list[Member]:
    """Router, experts (ordered as the router's outputs) and the student if there is one, each
    expert entry's signature checked against ``public_key``."""
    if manifest.get("format") != MANIFEST_FORMAT:
        raise TrustError(f"unsupported ensemble manifest (format {MANIFEST_FORMAT} expected)")
    router = manifest["router"]
    found = [Member("router.safetensors", "router", router["sha256"], router["size"], router["config"])]
    clusters = router["clusters"]
    if len(clusters) != len(manifest["experts"]):
        raise TrustError("the manifest's router and expert list disagree")
    for cluster, item in zip(clusters, manifest["experts"], strict=True):
        entry = item["entry"]
        if entry.get("format") != ENTRY_FORMAT:
            raise TrustError(f"unsupported expert entry in the manifest (format {ENTRY_FORMAT} expected)")
        verify_signature(
            public_key, canonical_json(entry), base64.b64decode(item["signature"]), f"expert {entry['expert_id']}"
        )
        if entry["cluster_id"] != cluster:
            raise TrustError("the manifest routes to a cluster its expert entry does not name")
        found.append(Member(f"expert-{cluster}.safetensors", "expert", entry["sha256"], entry["size"], entry["config"]))
    try:
        check_shares(manifest.get("shares"), len(clusters))
    except SharesError as exc:
        raise TrustError(str(exc)) from None
    student = manifest.get("student")
    if student is not None:
        if not is_sha256(str(student.get("sha256", ""))) or not isinstance(student.get("size"), int):
            raise TrustError("the manifest's student entry does not name a file by sha256 and size")
        found.append(Member("student.safetensors", "student", student["sha256"], student["size"], student["config"]))
    return found
