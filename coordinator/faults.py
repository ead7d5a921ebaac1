"""Fault points: a testing hook that kills the coordinator at a named moment.

The crash tests need to stop a real coordinator process at exact points of its work (a chunk
written but not yet committed, a checkpoint moved into the store but not yet signed, ...) and
check that a restart loses nothing. The code marks those points with ``fault_point(name)``;
the environment variable ``DDM_FAULT`` arms them:

    DDM_FAULT=upload.chunk_written        SIGKILL this process the first time the point is reached
    DDM_FAULT=upload.chunk_written:2      ... the second time
    DDM_FAULT=complete.stored,router.stored   several points (whichever comes first)

The variable is read once, when this module is imported. Unarmed, a fault point costs one
dictionary lookup. SIGKILL runs no shutdown code at all, which is the point: it is the crash
that a power cut or the OOM killer deals. Not for production use.

Points (see ``POINTS``):

    upload.chunk_written       UploadChunks: a chunk is durable in staging, its offset not committed
    upload.chunk_committed     UploadChunks: the chunk's offset is committed
    complete.stored            CompleteUpload: the checkpoint is in the store, the expert not verified
    complete.verified          CompleteUpload: the expert is verified, the entry not signed
    complete.signed            CompleteUpload: the entry is signed, the expert not registered
    router.training            router training, after each progress report (every log window)
    router.stored              the router is in the store, the ensemble not published
"""

from __future__ import annotations

import os
import signal
import sys
import threading

POINTS = (
    "upload.chunk_written",
    "upload.chunk_committed",
    "complete.stored",
    "complete.verified",
    "complete.signed",
    "router.training",
    "router.stored",
)


def parse(spec: str) -> dict[str, int]:
    """``"name[:N],..."`` -> {name: hits before the kill}; a malformed item is ignored, with a warning."""
    armed: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, count = item.partition(":")
        if name not in POINTS or (count and (not count.isdigit() or int(count) < 1)):
            sys.stderr.write(f"warning: DDM_FAULT item {item!r} ignored; use NAME or NAME:N, NAME one of {POINTS}\n")
            continue
        armed[name] = int(count or 1)
    return armed


_ARMED: dict[str, int] = parse(os.environ.get("DDM_FAULT", ""))
_LOCK = threading.Lock()


def fault_point(name: str) -> None:
    """SIGKILL this process if ``DDM_FAULT`` armed ``name`` and this is the hit it named."""
    if name not in _ARMED:
        return
    with _LOCK:
        _ARMED[name] -= 1
        if _ARMED[name] > 0:
            return
    sys.stderr.write(f"fault point {name}: killing process {os.getpid()}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
