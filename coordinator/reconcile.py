"""Reconciliation of the registry with the files of a coordinator home.

`ddm-coordinator serve` runs it before it listens, and `ddm-coordinator check` on demand. It
first asks SQLite for its integrity check and checks that the registry holds its experts (an
empty one beside a full store would make every file an orphan), and refuses to go on
otherwise. Then it removes what a crash can leave behind:

- a temporary file in artifacts/ (a store write cut before its rename);
- a file in artifacts/ that no Artifact row names (moved in, its row not yet committed), but
  not the checkpoint of an open upload: CompleteUpload moves it into the store before it
  registers it, and a retried completion finds it there;
- staged bytes of an upload that is no longer open;
- router training files of published ensembles, unless an assembly is under way.

A crash cannot remove or cut a registered artifact (its file is fsynced and renamed before
its row is committed), so an Artifact row whose file is missing, or has the wrong size or
(with ``rehash``) the wrong sha256, means outside damage: a disk, a person. A damaged file
is moved to HOME/damaged/ so it is never served. Each is flagged: an error in the log, an
``artifact_missing`` event, a problem in the summary and in `status` (which checks the store
itself). Then, so that nothing signed or published names a file the store cannot serve:

- an expert's signed checkpoint: the expert is reopened for retraining (its entry and
  signature dropped, an ``expert_reopened`` event). The island that trained it may still
  hold the file, and a bit-identical upload is accepted again.
- a router: it can be trained again, so nothing else is lost.
- either way, every published ensemble naming the file is withdrawn (``ensemble_withdrawn``;
  it is no longer served) and the artifact's row is dropped. Once every expert is signed
  again, `serve` assembles a new ensemble, as after any restart with none published.
- a data shard or the clustering: flagged only; restore the file from a backup (the
  coordinator cannot recreate it byte for byte in every case).

Every change is an event in the registry and a line in the log. Without ``repair``
(`check --dry-run`, or a home another process is serving) nothing is changed and the
summary says what would be done.

On a registry several `serve` processes share (PostgreSQL), the others go on serving while one
reconciles, so it also keeps its hands off what they may be doing: one process reconciles at a
time (the "reconcile" lock); a temporary, orphan or staged file younger than RECENT_S is left
alone (another process may be about to register it); staged bytes are judged holding the lock
that completions hold, and router work holding the assembly lock, each against rows read
afresh under it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import inspect, select
from sqlalchemy.exc import DatabaseError

from ddm_model.errors import DDMError
from protocol.manifest import Manifest
from protocol.trust import is_sha256, sha256_file

from .home import Home
from .registry import Expert, Registry, named_by
from .store import Store

log = logging.getLogger("ddm.coordinator")

STAGED_ROUTER = re.compile(r"^router-(\d+)\.safetensors$")  # Assembler: the router before it is stored
ROUTER_RUN = re.compile(r"^router-(\d+(?:-\d+)*)$")  # Assembler: resume state per set of clusters


RECENT_S = 600.0  # shared registry: a file modified this recently may be another process's work in progress
PAST = {"remove": "removed", "move": "moved", "flag": "flagged", "drop": "dropped", "close": "closed"}


class ReconcileError(DDMError):
    """A registry that must not be served: unreadable, failing its integrity check, or empty."""


@dataclass
class Reconciliation:
    repair: bool
    actions: list[str] = field(default_factory=list)  # what was changed (or would be, without repair)
    problems: list[str] = field(default_factory=list)  # damage a person should know of
    notes: list[str] = field(default_factory=list)
    integrity: str = ""  # "ok", or why it was not checked
    artifacts: int = 0
    hashed: int = 0

    def summary(self) -> str:
        verb = "changed" if self.repair else "to change"
        hashed = f", {self.hashed} re-hashed" if self.hashed else ""
        return (
            f"registry integrity {self.integrity}; {self.artifacts} artifacts{hashed};"
            f" {len(self.actions)} {verb}; {len(self.problems)} problem(s)"
        )


def check_integrity(registry: Registry) -> str:
    """SQLite's integrity check ("ok"; another database: a note), then that the registry holds
    its experts (ReconcileError otherwise) and is at this ddm's schema (RegistryError, naming
    `ddm-coordinator migrate`, otherwise)."""
    sqlite = registry.engine.dialect.name == "sqlite"
    where = registry.url.removeprefix("sqlite:///") if sqlite else "at the configured URL"
    integrity = "ok" if sqlite else f"not checked ({registry.engine.dialect.name} database: use its own tools)"
    try:
        with registry.engine.connect() as conn:
            rows = [str(r) for r in conn.exec_driver_sql("PRAGMA integrity_check").scalars()] if sqlite else ["ok"]
            if rows != ["ok"]:
                found = [line for r in rows for line in r.splitlines() if line.strip() and not line.startswith("***")]
                found = found or ["(no detail)"]
                more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
                raise ReconcileError(
                    f"the registry database {where} fails SQLite's integrity check: {found[0][:200]}{more};"
                    " refusing to serve it: restore it from a backup"
                )
            if not inspect(conn).has_table("experts") or not conn.execute(select(Expert.id).limit(1)).first():
                # An empty registry beside a full store would make every artifact an orphan.
                raise ReconcileError(
                    f"the registry database {where} holds no experts: was it lost or replaced? restore it from a"
                    " backup (nothing in the home was changed)"
                )
    except DatabaseError as exc:
        why = (str(exc.orig).splitlines() or ["unreadable"])[0]
        raise ReconcileError(f"cannot read the registry database {where} ({why}); restore it from a backup") from None
    registry.require_current_schema()  # an older registry is upgraded by `migrate`, never on the fly
    return integrity


def reconcile(
    home: Home, registry: Registry, store: Store, rehash: bool = False, repair: bool = True
) -> Reconciliation:
    """Check the registry, then bring the home's files and rows into agreement (see the module)."""
    result = Reconciliation(repair=repair)
    result.integrity = check_integrity(registry)
    with registry.exclusive("reconcile") if registry.shared else nullcontext():
        _Pass(home, registry, store, result, rehash).run()
    return result


class _Pass:
    def __init__(self, home: Home, registry: Registry, store: Store, result: Reconciliation, rehash: bool):
        self.home = home
        self.registry = registry
        self.store = store
        self.result = result
        self.rehash = rehash
        self.shared = registry.shared
        self.snap = registry.snapshot()

    def run(self) -> None:
        self._temporary_files()
        self._registered_artifacts()
        self._orphans()
        with self._holding("complete") as held:  # CompleteUpload moves staged files into the store
            if held:
                self._staging()
        with self._holding("assembly") as held:
            if held:
                self._router_work()
            else:
                self.note("router work left alone: another process is assembling")

    @contextmanager
    def _holding(self, lock: str):
        """Shared registry: hold ``lock`` (the assembly's only if free) and read the rows afresh
        under it; otherwise nothing to hold."""
        if not self.shared:
            yield True
            return
        with self.registry.exclusive(lock, wait=lock != "assembly") as held:
            if held:
                self.snap = self.registry.snapshot()
            yield held

    def _young(self, path: Path) -> bool:
        """Shared registry: whether ``path`` changed too recently to be judged (see the module)."""
        try:
            return self.shared and time.time() - path.stat().st_mtime < RECENT_S
        except FileNotFoundError:
            return True  # gone meanwhile: another process's doing

    # -- the two kinds of outcome -------------------------------------------------------------

    def act(self, verb: str, what: str, event: str, do=None, level=logging.INFO, **detail) -> None:
        """Record an action; with repair, do it, log it and add it to the event log."""
        if not self.result.repair:
            self.result.actions.append(f"would {verb} {what}")
            return
        if do is not None:
            do()
        message = f"{PAST[verb]} {what}"
        self.result.actions.append(message)
        log.log(level, "reconcile: %s", message)
        self.registry.record(event, **detail)

    def note(self, message: str) -> None:
        self.result.notes.append(message)
        log.info("reconcile: %s", message)

    def problem(self, message: str) -> None:
        self.result.problems.append(message)
        if self.result.repair:
            log.error("reconcile: %s", message)

    # -- the passes -------------------------------------------------------------------------------

    def _temporary_files(self) -> None:
        for path in sorted(self.store.artifacts.iterdir()):
            if path.is_file() and path.name.startswith(".") and path.name.endswith(".tmp") and not self._young(path):
                self.act(
                    "remove",
                    f"the unfinished store write {path.name}",
                    "store_tmp_removed",
                    lambda p=path: p.unlink(missing_ok=True),
                    file=path.name,
                )

    def _registered_artifacts(self) -> None:
        rows = self.snap["artifacts"]
        self.result.artifacts = len(rows)
        for row in sorted(rows, key=lambda r: (r["kind"], r["sha256"])):
            sha, path = row["sha256"], self.store.path(row["sha256"])
            if not path.is_file():
                self._lost(row, "its file is missing")
                continue
            size = path.stat().st_size
            if size != row["size"]:
                self._lost(row, f"its file holds {size} bytes, {row['size']} were registered", damaged=path)
                continue
            if self.rehash:
                self.result.hashed += 1
                actual = sha256_file(path)
                if actual != sha:
                    self._lost(row, f"its file hashes to {actual[:12]}…", damaged=path)

    def _lost(self, row: dict, why: str, damaged: Path | None = None) -> None:
        sha, kind = row["sha256"], row["kind"]
        self.problem(f"{kind} artifact {sha[:12]}… is lost: {why}")
        if damaged is not None:
            self.act(
                "move",
                f"the damaged {kind} file {sha[:12]}… to {self.home.damaged.name}/",
                "artifact_damaged",
                lambda: self._set_aside(damaged),
                level=logging.ERROR,
                sha256=sha,
                artifact_kind=kind,
                reason=why,
            )
        if kind not in ("expert", "router", "student"):
            self.act(
                "flag",
                f"the missing {kind} {sha[:12]}…; restore artifacts/{sha} from a backup",
                "artifact_missing",
                level=logging.ERROR,
                sha256=sha,
                artifact_kind=kind,
                reason=why,
                action="flagged",
            )
            return
        experts = [e for e in self.snap["experts"] if e["checkpoint_sha256"] == sha and e["state"] == "signed"]
        withdrawn = [e for e in self.snap["ensembles"] if e["state"] == "published" and sha in _names(e)]
        consequence = [f"expert {e['id']} reopened for retraining" for e in experts]
        consequence += [f"ensemble {e['id']} withdrawn" for e in withdrawn]
        self.act(
            "drop",
            f"the lost {kind} {sha[:12]}…" + (f": {', '.join(consequence)}" if consequence else ""),
            "artifact_missing",
            lambda: self.registry.drop_lost_artifact(
                sha, kind, why, [e["id"] for e in experts], [e["id"] for e in withdrawn]
            ),
            level=logging.ERROR,
            sha256=sha,
            artifact_kind=kind,
            reason=why,
            action="dropped",
            experts_reopened=[e["id"] for e in experts],
            ensembles_withdrawn=[e["id"] for e in withdrawn],
        )

    def _set_aside(self, path: Path) -> None:
        self.home.damaged.mkdir(exist_ok=True)
        target = self.home.damaged / path.name
        n = 1
        while target.exists():
            target, n = self.home.damaged / f"{path.name}.{n}", n + 1
        os.replace(path, target)

    def _orphans(self) -> None:
        named = {row["sha256"] for row in self.snap["artifacts"]}
        uploading = {u["sha256"]: u["id"] for u in self.snap["uploads"] if u["state"] == "open"}
        for path in sorted(self.store.artifacts.iterdir()):
            name = path.name
            if not path.is_file() or name in named or name.endswith(".tmp"):
                continue
            if not is_sha256(name):
                self.note(f"artifacts/{name} is not a ddm artifact; left alone")
                continue
            if name in uploading:
                self.note(f"kept {name[:12]}…: the checkpoint of open upload {uploading[name]}")
                continue
            if self._young(path):
                self.note(f"kept {name[:12]}…: written in the last {RECENT_S:.0f} s, maybe by another process")
                continue
            self.act(
                "remove",
                f"the orphan {name[:12]}… (no artifact row names it)",
                "store_orphan_removed",
                lambda p=path: p.unlink(missing_ok=True),
                level=logging.WARNING,
                sha256=name,
            )

    def _staging(self) -> None:
        open_uploads = {u["id"]: u for u in self.snap["uploads"] if u["state"] == "open"}
        for path in sorted(self.store.staging.iterdir()):
            if path.name in open_uploads or not path.is_file() or self._young(path):
                continue
            self.act(
                "remove",
                f"staged bytes {path.name} (no open upload)",
                "staging_removed",
                lambda p=path: p.unlink(missing_ok=True),
                file=path.name,
            )
        for upload in open_uploads.values():
            staged = (self.store.staging / upload["id"]).exists()
            if upload["committed_offset"] > 0 and not staged and not self.store.has(upload["sha256"]):
                self.problem(f"upload {upload['id']} lost its {upload['committed_offset']} committed bytes")
                # Its island begins a new upload at its next attempt (reject_upload logs the event).
                self.act(
                    "close",
                    f"upload {upload['id']}: its staged bytes are gone",
                    "staged_bytes_lost",
                    lambda u=upload["id"]: self.registry.reject_upload(u, "its staged bytes are gone"),
                    level=logging.WARNING,
                    upload_id=upload["id"],
                )

    def _router_work(self) -> None:
        work = self.home.work
        if not work.is_dir():
            return
        ensembles = {e["id"]: e for e in self.snap["ensembles"]}
        assembling = any(e["state"] == "training" for e in ensembles.values())
        finished = {tuple(_clusters(e)) for e in ensembles.values() if e["state"] == "published"}
        for path in sorted(work.iterdir()):
            staged, run = STAGED_ROUTER.match(path.name), ROUTER_RUN.match(path.name)
            if staged and path.is_file():
                ensemble = ensembles.get(int(staged.group(1)))
                if ensemble is None or ensemble["state"] != "training":
                    self.act(
                        "remove",
                        f"the exported router {path.name} of a finished assembly",
                        "work_removed",
                        lambda p=path: p.unlink(missing_ok=True),
                        path=f"work/{path.name}",
                    )
            elif run and path.is_dir() and not assembling:
                clusters = tuple(int(c) for c in run.group(1).split("-"))
                if clusters in finished:
                    self.act(
                        "remove",
                        f"the router training state {path.name} of a published ensemble",
                        "work_removed",
                        lambda p=path: shutil.rmtree(p, ignore_errors=True),
                        path=f"work/{path.name}",
                    )


def _names(ensemble: dict) -> set[str]:
    """Every artifact a published ensemble names."""
    return named_by(ensemble["manifest_json"], ensemble["router_sha256"])


def _clusters(ensemble: dict) -> list[int]:
    return Manifest.stored(ensemble["manifest_json"]).clusters
