"""The registry's core: the engine, its transactions, the event log, and plain reads.

SQLite in WAL mode (synchronous=FULL, so a committed row survives a crash) is the default;
PostgreSQL (psycopg 3) is the registry several `serve` processes share. Every operation is one
transaction, and write transactions run one at a time, so a read-then-write cannot interleave
with another's: within a process by a lock, and across processes by SQLite's own single writer
or, on PostgreSQL, a transaction-level advisory lock taken first in every write transaction.
State changes are also conditional UPDATEs checked by row count. Reads take no lock.

``exclusive(name)`` is a named lock that holds across processes and dies with its holder
(a PostgreSQL session advisory lock, or an flock beside a SQLite file): the assembly and the
completion of uploads use it, so that exactly one process at a time does either.

Heartbeats may be buffered (``buffered_heartbeat``, leases.py): checked against the database at
once, written in one transaction per ``flush_heartbeats``.

Every state change appends one row to the event log in the same transaction; progress
(heartbeat steps, chunks, router steps) and traffic counters are not events. Time comes from
an injectable clock (coordinator/clock.py).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, event, select, text
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ddm_model.errors import DDMError

from ..clock import Clock, SystemClock
from . import schema
from .tables import Artifact, Ensemble, Event, Expert, Invite, Island, Lease, Upload


class RegistryError(DDMError):
    """A request the registry refuses; ``code`` names the kind of refusal."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Revoked(RegistryError):
    """A call by, or on behalf of, an island whose access the coordinator revoked."""

    def __init__(self, reason: str):
        super().__init__("permission_denied", revoked_message(reason))


def revoked_message(reason: str) -> str:
    return (
        f"this island's access was revoked by the coordinator ({reason}); it may no longer lease, upload or"
        " download. Ask the coordinator's operator for a new invite if this is a mistake"
    )


def shown(value: str, limit: int = 64) -> str:
    """A caller's string as a refusal may echo it: escaped to one printable line, bounded."""
    text = repr(value[:limit])[1:-1]
    return text + "..." if len(value) > limit else text


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def iso(ts: float | None) -> str:
    return "" if ts is None else dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


class Core:
    def __init__(self, url: str, lease_seconds: float = 120.0, clock: Clock | None = None):
        self.url = url
        self.lease_seconds = lease_seconds
        self.clock = clock or SystemClock()
        try:
            self.engine = create_engine(url, future=True, **_pool_options(url))
        except (ArgumentError, NoSuchModuleError, ImportError) as exc:
            raise RegistryError("invalid_argument", f"cannot use the database URL {url!r}: {exc}") from None
        self.dialect = self.engine.dialect.name
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.Session = sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock = threading.RLock()
        self._beats: dict[str, tuple] = {}  # lease id -> the newest buffered heartbeat (leases.py)
        self._beats_lock = threading.Lock()
        # Training curves (leases.py): a point is kept when a lease's step has advanced by at
        # least this many steps since its last kept point (`serve` sets it from the run's length).
        self.curve_every_steps = 1
        self._curve_last: dict[str, int] = {}  # lease id -> the step of its last kept point

    @property
    def shared(self) -> bool:
        """Whether several `serve` processes may share this registry (not SQLite's)."""
        return self.dialect != "sqlite"

    def create(self) -> None:
        """Make a new registry's tables by running every migration (schema.py)."""
        try:
            schema.upgrade(self.engine)
        except OperationalError as exc:
            raise RegistryError("unavailable", f"cannot open the registry database: {exc.orig}") from None

    def migrate(self) -> tuple[str | None, str]:
        """Upgrade the registry in place to this ddm's schema; (revision before, after)."""
        return schema.upgrade(self.engine)

    def require_current_schema(self) -> str:
        """The registry's revision, or one line that names the command to upgrade it."""
        try:
            current, wanted = schema.revision(self.engine), schema.head()
        except OperationalError as exc:
            raise RegistryError("unavailable", f"cannot open the registry database: {exc.orig}") from None
        if current != wanted:
            made = "ddm 0.1, before migrations" if current == schema.BASELINE else f"revision {current}"
            raise RegistryError(
                "failed_precondition",
                f"the registry's schema is from {made}; this ddm needs revision {wanted}: back up the"
                " database, then run `ddm-coordinator migrate`",
            )
        return current

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self._write_lock, self.Session.begin() as session:
            if self.dialect == "postgresql":  # one writer at a time across processes, till commit
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key("write")})
            yield session

    @contextmanager
    def exclusive(self, name: str, wait: bool = True) -> Iterator[bool]:
        """Hold the lock ``name`` across every process of this registry; yields False, holding
        nothing, if ``wait`` is False and another holder has it. The lock ends with its holder's
        process, however it ends (a PostgreSQL session lock dies with its connection, an flock
        with its file)."""
        if self.dialect == "postgresql":
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                key = {"key": lock_key(name)}
                if wait:
                    conn.execute(text("SELECT pg_advisory_lock(:key)"), key)
                elif not conn.execute(text("SELECT pg_try_advisory_lock(:key)"), key).scalar():
                    yield False
                    return
                try:
                    yield True
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), key)
            return
        database = self.engine.url.database
        if self.dialect != "sqlite" or not database or database == ":memory:":
            raise RegistryError("unimplemented", f"no cross-process lock for a {self.dialect} registry at {self.url}")
        with open(f"{database}.{name}.lock", "a") as held:  # one open file per holder: threads exclude too
            try:
                fcntl.flock(held, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(held, fcntl.LOCK_UN)

    def log(
        self, session: Session, kind: str, island_id: str | None = None, expert_id: int | None = None, **detail
    ) -> None:
        """Append an event in the caller's transaction."""
        session.add(
            Event(at=self.clock.now(), kind=kind, island_id=island_id, expert_id=expert_id, detail=json.dumps(detail))
        )

    def record(self, kind: str, island_id: str | None = None, expert_id: int | None = None, **detail) -> None:
        """Append an event in a transaction of its own: a change made outside the database
        (a file removed or moved) that the log should hold."""
        with self.transaction() as s:
            self.log(s, kind, island_id, expert_id, **detail)

    def add_experts(self, rows: list[tuple[int, str, str]]) -> None:
        """(cluster id, shard sha256, shard fingerprint) per expert; expert id = cluster id."""
        now = self.clock.now()
        with self.transaction() as s:
            for cluster_id, shard, fingerprint in rows:
                s.add(
                    Expert(
                        id=cluster_id,
                        cluster_id=cluster_id,
                        state="open",
                        shard_sha256=shard,
                        shard_fingerprint=fingerprint,
                        updated_at=now,
                    )
                )
            self.log(s, "init", experts=len(rows))

    @staticmethod
    def _require_access(s: Session, island_id: str) -> None:
        island = s.get(Island, island_id)
        if island is not None and island.revoked_at is not None:
            raise Revoked(island.revoked_reason)

    # -- reading ----------------------------------------------------------------------------

    def experts(self) -> list[Expert]:
        with self.Session() as s:
            return list(s.scalars(select(Expert).order_by(Expert.id)).all())

    def expert(self, expert_id: int) -> Expert:
        with self.Session() as s:
            return s.get(Expert, expert_id)

    def lease(self, lease_id: str) -> Lease | None:
        with self.Session() as s:
            return s.get(Lease, lease_id)

    def artifact(self, sha256: str) -> Artifact | None:
        with self.Session() as s:
            return s.get(Artifact, sha256)

    def snapshot(self) -> dict:
        """Every table but the event log, as plain rows: what status shows and tests compare."""
        with self.Session() as s:

            def rows(model):
                return [
                    {c.name: getattr(r, c.name) for c in model.__table__.columns}
                    for r in s.scalars(select(model)).all()
                ]

            return {
                "islands": rows(Island),
                "invites": rows(Invite),
                "experts": rows(Expert),
                "leases": rows(Lease),
                "uploads": rows(Upload),
                "artifacts": rows(Artifact),
                "ensembles": rows(Ensemble),
            }

    def events(self, limit: int | None = None, island_id: str | None = None, kind: str | None = None) -> list[Event]:
        """The event log, oldest first; the last ``limit`` events matching the filters."""
        query = select(Event)
        if island_id is not None:
            query = query.where(Event.island_id == island_id)
        if kind is not None:
            query = query.where(Event.kind == kind)
        with self.Session() as s:
            if limit is None:
                return list(s.scalars(query.order_by(Event.id)).all())
            return list(reversed(s.scalars(query.order_by(Event.id.desc()).limit(limit)).all()))


def lock_key(name: str) -> int:
    """A PostgreSQL advisory lock key (a signed 64-bit integer) for a ddm lock name."""
    return int.from_bytes(hashlib.sha256(f"ddm.registry:{name}".encode()).digest()[:8], "big", signed=True)


def _pool_options(url: str) -> dict:
    """SQLite: SQLAlchemy's defaults. A server database: at most 16 connections per process
    (writes queue for one lock anyway), so that several `serve` processes stay well inside
    PostgreSQL's default max_connections of 100."""
    if url.startswith("sqlite"):
        return {}
    return {"pool_size": 8, "max_overflow": 8}


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
