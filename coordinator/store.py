"""The content-addressed artifact store and the staging area for uploads.

An artifact lives at ``artifacts/<sha256>`` and is never rewritten. It enters the store by a
rename of a verified, fsynced file, so a crash leaves it either absent or whole; the database
row that names it is committed after the rename.

A write that finds the disk full (ENOSPC, EDQUOT, or EFBIG past a file size limit) raises
``DiskFull`` and leaves nothing behind that a caller could take for written: a staged chunk is
recorded only after ``write_chunk`` returns, and a file enters the store whole or not at all.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ddm_model.errors import DDMError
from ddm_model.fsutil import fsync_dir
from protocol.trust import is_sha256, sha256_file

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFull(DDMError):
    """The store's disk (or a quota or file size limit) has no room for a write."""

    code = "resource_exhausted"


@contextmanager
def _disk_full_is_an_answer(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno not in FULL:
            raise
        raise DiskFull(
            f"the coordinator's disk is full ({exc.strerror}); {what}; try again once its operator has freed space"
        ) from None


class Store:
    def __init__(self, artifacts: Path, staging: Path):
        self.artifacts = artifacts
        self.staging = staging
        artifacts.mkdir(parents=True, exist_ok=True)
        staging.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.artifacts / sha256

    def has(self, sha256: str) -> bool:
        return is_sha256(sha256) and self.path(sha256).exists()

    def add_file(self, source: Path, move: bool = False, digest: str | None = None) -> tuple[str, int]:
        """Put a file into the store under its own sha256 (``digest`` if the caller has just
        computed it); returns (sha256, size)."""
        digest = digest or sha256_file(source)
        target = self.path(digest)
        size = source.stat().st_size
        if target.exists():
            if move:
                source.unlink()
            return digest, size
        tmp = self.artifacts / f".{digest}.tmp"
        with _disk_full_is_an_answer("nothing entered the store"):
            try:
                if move:
                    os.replace(source, tmp)
                else:
                    shutil.copyfile(source, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o444)
                os.replace(tmp, target)
            except OSError:
                if move and tmp.exists():
                    os.replace(tmp, source)  # the caller keeps its file
                tmp.unlink(missing_ok=True)
                raise
            fsync_dir(self.artifacts)
        return digest, size

    def read(self, sha256: str, offset: int, chunk: int) -> Iterator[tuple[int, bytes, int]]:
        """(offset, bytes, total size) blocks of an artifact from ``offset``."""
        path = self.path(sha256)
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(offset)
            while offset < size:
                data = f.read(chunk)
                if not data:
                    break
                yield offset, data, size
                offset += len(data)

    # -- staging ----------------------------------------------------------------------------

    def staging_path(self, upload_id: str) -> Path:
        if not upload_id.isalnum():
            raise ValueError(f"bad upload id {upload_id!r}")
        return self.staging / upload_id

    def write_chunk(self, upload_id: str, offset: int, data: bytes) -> None:
        """Write bytes at their offset and make them durable before anyone records them."""
        path = self.staging_path(upload_id)
        created = not path.exists()
        with _disk_full_is_an_answer("this chunk was not committed, the ones before it are kept"):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                view = memoryview(data)
                while view:  # a write may stop short (a disk filling up); the rest follows or fails
                    written = os.pwrite(fd, view, offset)
                    if written == 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    view, offset = view[written:], offset + written
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.staging)  # the new file's name is durable too

    def seal_staged(self, upload_id: str, size: int) -> Path:
        """Cut the staged file to its declared size (bytes past the committed offset from a
        crash are dropped) and return its path."""
        path = self.staging_path(upload_id)
        with _disk_full_is_an_answer("the upload keeps its committed bytes"), open(path, "rb+") as f:
            f.truncate(size)
            os.fsync(f.fileno())
        return path

    def discard_staged(self, upload_id: str) -> None:
        self.staging_path(upload_id).unlink(missing_ok=True)

    def staged(self) -> list[str]:
        """The names of the files in staging."""
        return [entry.name for entry in os.scandir(self.staging) if entry.is_file(follow_symlinks=False)]

    def discard_unowned(self, names: list[str]) -> None:
        """Delete staged files by name (``staged`` listed them; any name, not only upload ids)."""
        for name in names:
            (self.staging / name).unlink(missing_ok=True)
