"""Train a ddm ensemble over a Flower federation: the ServerApp (flwr, the ``flower`` extra).

Each Flower node is an island. The ServerApp opens a coordinator home (``ddm-coordinator
init``) and works it as ``serve`` does, with Flower messages in place of ddm's gRPC port:

    node idle -> lease (registry) -> "train.expert" message (the lease as the island gets it,
    TTL ``expert-timeout-s``) -> the node trains with ddm's own loop on its own data
    (client/flower_client.py) -> reply carrying the checkpoint -> the upload path every island's
    checkpoint takes (begin, chunks, complete: validation, probe scoring in shared mode,
    signing, registration) -> once every expert is signed, the router and the signed ensemble.

While a message is out, the ServerApp keeps its lease alive on the node's behalf; the lease
ends (and its expert opens for another node) when the node leaves the federation for longer
than the home's lease time, when no reply came within the TTL, or when the reply is an error
or a checkpoint the coordinator rejects. Such a node gets no more work in this run. A
ServerApp that dies leaves leases that expire like any island's; `flwr run` again resumes the
open experts, and each node resumes its training from its own local checkpoint.

Checkpoints come back inside the Flower reply by default: a site then needs to reach nothing
but its SuperLink, which is the point of running over Flower. With ``listen`` set, the ServerApp
also serves ddm's gRPC port (TLS with the home's certificate) and each message tells the node
where it is (``address``), its island's credential and the certificate's fingerprint to pin; a
node that can reach it uploads through ddm's resumable, chunked upload (nothing held in the
SuperLink's memory, a broken transfer resumed from its committed offset) and answers with the
digest alone; a node that cannot, or whose operator says ``upload="reply"``, answers with the
checkpoint as before.

Run config (``flwr run --run-config``): ``home`` (required), ``expert-timeout-s`` (43200),
``poll-s`` (2), ``wait-for-nodes-s`` (600: how long to wait for a node that can take work),
``listen`` ("": no port), ``address`` (what nodes dial; default ``listen``), ``no-tls`` (false:
plaintext, on loopback only). Nothing else in ddm imports this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from ddm_model.fsutil import atomic_path
from ddm_model.progress import log_to_stderr
from protocol import ddm_pb2 as pb
from protocol.address import is_loopback, split_address
from protocol.flower import CHECKPOINT, FILE, FORMAT, MESSAGE_TYPE, RAW, RECORD, SHARD, UPLOAD
from protocol.limits import MAX_CHUNK_BYTES, MAX_REASON_CHARS

from .flower_project import RunSettings
from .home import Home, HomeError
from .refusals import Refused
from .registry import Grant, RegistryError, Revoked, shown
from .server import Coordinator, CoordinatorServer
from .tls import load_server_tls

log = logging.getLogger("ddm.coordinator")

NODES_FILE = "flower-nodes.json"  # HOME/flower-nodes.json: which island each Flower node is


@dataclass
class Job:
    """A train message out at a node."""

    node_id: int
    island_id: str
    grant: Grant
    sent_at: float  # monotonic
    missing_since: float | None = None
    uploaded: bool = False  # its expert is signed through ddm's port; the reply is still to come


@dataclass
class Outcome:
    """How a run ended: the experts signed in it, and what each node's failure was."""

    signed: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # node id -> why it gets no more work
    published: int | None = None  # the ensemble id, once every expert is signed and assembled
    open_experts: list[int] = field(default_factory=list)


class NodeIslands:
    """Which island each Flower node is, and its credential (sent to the node only when it may
    upload through ddm's port), kept in HOME/flower-nodes.json (mode 600) so that a node keeps
    its island, its lease and its place in the event log across runs."""

    def __init__(self, home: Home, coordinator: Coordinator):
        self.path = home.root / NODES_FILE
        self.registry = coordinator.registry
        try:
            raw = json.loads(self.path.read_text()) if self.path.exists() else {}
            self.known = {int(node): (str(v["island"]), str(v["credential"])) for node, v in raw.items()}
        except (ValueError, AttributeError, KeyError, TypeError) as exc:
            why = f"{self.path} is damaged ({exc!r}); restore it or delete it to enroll the nodes anew"
            raise HomeError(why) from None

    def island(self, node_id: int) -> str:
        return self.enrolled(node_id)[0]

    def credential(self, node_id: int) -> str:
        return self.enrolled(node_id)[1]

    def enrolled(self, node_id: int) -> tuple[str, str]:
        if node_id not in self.known:
            token = self.registry.create_invite("island", ttl_seconds=60)
            island, credential = self.registry.redeem_invite(token, f"flower node {node_id}")
            self.known[node_id] = (island.id, credential)
            table = {str(k): {"island": i, "credential": c} for k, (i, c) in sorted(self.known.items())}
            with atomic_path(self.path, mode=0o600) as tmp:
                tmp.write_text(json.dumps(table, indent=1))
            log.info("flower node %d is island %s", node_id, island.id)
        return self.known[node_id]


def train_message(lease: pb.Lease, shard: bytes | None, upload: dict | None = None) -> RecordDict:
    """What a node receives: the lease exactly as a ddm island gets it, in shared mode the
    cluster's shard (a siloed node trains on its own data), and where it may upload to."""
    content = RecordDict({RECORD: ConfigRecord({"format": FORMAT, "lease": lease.SerializeToString()})})
    if shard is not None:
        content[SHARD] = ArrayRecord({FILE: raw_array(shard)})
    if upload is not None:
        content[UPLOAD] = ConfigRecord(upload)
    return content


def raw_array(data: bytes) -> Array:
    """A file's bytes as one Flower Array (Flower sends it in chunks); read back with ``.data``."""
    return Array(dtype="uint8", shape=(len(data),), stype=RAW, data=data)


def reply_checkpoint(reply: Message) -> tuple[bytes | None, str]:
    """The checkpoint's bytes and declared sha256 from a node's reply, or (None, sha256) when the
    node uploaded it through ddm's port; ValueError if the reply is neither (a refusal's reason,
    a malformed or foreign reply)."""
    if reply.has_error():
        raise ValueError(f"the node failed: {shown(reply.error.reason, MAX_REASON_CHARS)}")
    content = reply.content
    result = content.config_records.get(RECORD)
    if result is None or result.get("format") != FORMAT:
        raise ValueError("its reply is not a ddm reply of this format")
    if "refused" in result:
        raise ValueError(f"the node refused the lease: {shown(str(result['refused']), MAX_REASON_CHARS)}")
    if isinstance(result.get("uploaded"), str):
        return None, result["uploaded"]
    record = content.array_records.get(CHECKPOINT)
    if record is None or FILE not in record:
        raise ValueError("its reply carries no checkpoint")
    data, sha256 = record[FILE].data, result.get("sha256")
    if not isinstance(data, bytes) or not isinstance(sha256, str):
        raise ValueError("its reply's checkpoint or sha256 has the wrong type")
    return data, sha256


def chunks(upload_id: str, data: bytes) -> Iterator[pb.UploadChunk]:
    for offset in range(0, len(data), MAX_CHUNK_BYTES):
        piece = data[offset : offset + MAX_CHUNK_BYTES]
        yield pb.UploadChunk(upload_id=upload_id, offset=offset, data=piece, sha256=hashlib.sha256(piece).hexdigest())


class FlowerRun:
    """One `flwr run`: leases out, replies in, until every expert is signed and the ensemble is
    published, or no node is left that can take the open experts."""

    def __init__(
        self,
        grid: Grid,
        coordinator: Coordinator,
        settings: RunSettings,
        clock=time.monotonic,
        tls_fingerprint: str | None = None,
    ):
        self.grid = grid
        self.coordinator = coordinator
        self.registry = coordinator.registry
        self.service = coordinator.service
        self.settings = settings
        self.clock = clock
        self.nodes = NodeIslands(coordinator.home, coordinator)
        self.tls_fingerprint = tls_fingerprint  # of the certificate served on settings.listen
        self.out: dict[str, Job] = {}  # message id -> job
        self.outcome = Outcome()

    def run(self) -> Outcome:
        idle_since = self.clock()
        while not self._all_signed():
            present = set(self.grid.get_node_ids())
            sent = self._lease_out(present)
            self._take_replies()
            self._watch(present)
            if self.out or sent:
                idle_since = self.clock()
            elif self.clock() - idle_since > self.settings.wait_for_nodes_s:
                break  # no node can take the open experts
            time.sleep(self.settings.poll_s)
        self._finish()
        return self.outcome

    def _upload_record(self, node_id: int) -> dict | None:
        """Where and as whom the node may upload through ddm's port; None without one."""
        if not self.settings.listen:
            return None
        return {
            "address": self.settings.address,
            "credential": self.nodes.credential(node_id),
            "tls-fingerprint": self.tls_fingerprint or "",  # "": plaintext (loopback)
            "public-key": self.coordinator.key.public_bytes.hex(),
        }

    def _all_signed(self) -> bool:
        return all(e.state == "signed" for e in self.registry.experts())

    # -- leases out -----------------------------------------------------------------------------

    def _lease_out(self, present: set[int]) -> int:
        busy = {job.node_id for job in self.out.values()}
        sent = 0
        for node_id in sorted(present - busy - set(self.outcome.failed)):
            island_id = self.nodes.island(node_id)
            try:
                grant = self.registry.acquire_lease(island_id)
            except Revoked as exc:
                self._fail(node_id, f"its island {island_id} is revoked ({exc})")
                continue
            if not isinstance(grant, Grant):
                continue  # no open expert for it now
            lease = self.service.lease_message(grant)
            shard = None
            if lease.WhichOneof("data") == "shard":
                shard = self.coordinator.store.path(grant.shard_sha256).read_bytes()
            message = Message(
                content=train_message(lease, shard, self._upload_record(node_id)),
                dst_node_id=node_id,
                message_type=MESSAGE_TYPE,
                ttl=self.settings.expert_timeout_s,
                group_id=f"expert-{grant.expert_id}",
            )
            (message_id,) = list(self.grid.push_messages([message]))
            self.out[message_id] = Job(node_id, island_id, grant, self.clock())
            log.info(
                "expert %d to flower node %d (island %s, lease %s)", grant.expert_id, node_id, island_id, grant.lease_id
            )
            sent += 1
        return sent

    # -- replies in -----------------------------------------------------------------------------

    def _take_replies(self) -> None:
        if not self.out:
            return
        for reply in self.grid.pull_messages(list(self.out)):
            job = self.out.pop(reply.metadata.reply_to_message_id, None)
            if job is not None:
                self._settle(job, reply)

    def _settle(self, job: Job, reply: Message) -> None:
        """Take a node's checkpoint through the upload path; a failure ends the lease."""
        expert = job.grant.expert_id
        try:
            data, sha256 = reply_checkpoint(reply)
            if data is None:
                self._uploaded(job, sha256)
                how = "uploaded through ddm's port"
            else:
                upload = self.service.begin_upload(job.island_id, job.grant.lease_id, len(data), sha256)
                self.service.receive(job.island_id, chunks(upload.id, data))
                self.service.complete_upload(job.island_id, upload.id)
                how = "in its reply"
        except (ValueError, Refused, RegistryError) as exc:
            self._end(job, f"expert {expert}: {exc}")
            return
        log.info("expert %d from flower node %d (%s) is signed", expert, job.node_id, how)
        self.outcome.signed.append(expert)

    def _uploaded(self, job: Job, sha256: str) -> None:
        """A node says it uploaded through ddm's port: its completion signed exactly that file
        for this island, or the claim is refused."""
        if self._signed_by(job) != sha256:
            raise ValueError("it claims an upload the coordinator has not signed")

    def _signed_by(self, job: Job) -> str | None:
        """The sha256 of the job's expert if this job's island signed it, else None."""
        expert = self.registry.expert(job.grant.expert_id)
        if expert.state != "signed" or json.loads(expert.entry_json)["island_id"] != job.island_id:
            return None
        return expert.checkpoint_sha256

    # -- leases kept alive or ended -------------------------------------------------------------

    def _watch(self, present: set[int]) -> None:
        """Keep the leases of messages out alive, and end those whose node left or is late."""
        now = self.clock()
        for message_id, job in list(self.out.items()):
            if job.node_id in present:
                job.missing_since = None
            elif job.missing_since is None:
                job.missing_since = now
            if now - job.sent_at > self.settings.expert_timeout_s:
                why = f"no reply within {self.settings.expert_timeout_s:.0f} s"
            elif job.missing_since is not None and now - job.missing_since > self.coordinator.config.lease_seconds:
                why = "the node left the federation"
            else:
                if not job.uploaded:
                    try:
                        self.registry.buffered_heartbeat(job.island_id, job.grant.lease_id, 0, math.nan, 0.0)
                    except RegistryError as exc:  # revoked, or the lease was ended from outside ...
                        if self._signed_by(job):
                            # ... or completed: the node's upload through ddm's port signed its
                            # expert before its reply came. The reply settles the job.
                            job.uploaded = True
                        else:
                            del self.out[message_id]
                            self._fail(job.node_id, str(exc))
                continue
            del self.out[message_id]
            self._end(job, f"expert {job.grant.expert_id}: {why}")

    def _end(self, job: Job, why: str) -> None:
        with contextlib.suppress(RegistryError):  # already ended (expired, revoked): its expert is open either way
            self.registry.release_lease(job.island_id, job.grant.lease_id, why[:MAX_REASON_CHARS])
        self._fail(job.node_id, why)

    def _fail(self, node_id: int, why: str) -> None:
        log.warning("flower node %d gets no more work in this run: %s", node_id, why)
        self.outcome.failed[node_id] = why

    # -- the end --------------------------------------------------------------------------------

    def _finish(self) -> None:
        for job in self.out.values():  # messages still out when the last expert was signed
            if self._signed_by(job):
                self.outcome.signed.append(job.grant.expert_id)  # through ddm's port: the reply is moot
            else:
                self._end(job, f"expert {job.grant.expert_id}: the ServerApp run ended before the reply")
        self.out.clear()
        self.outcome.open_experts = [e.id for e in self.registry.experts() if e.state != "signed"]
        if self.outcome.open_experts:
            return
        assembler = self.coordinator.assembler
        assembler.request()  # a no-op if the last completion already started it
        while assembler.running:
            assembler.join(timeout=1.0)
        published = self.registry.latest_published()
        if published is not None and not self.registry.assembly_due():
            self.outcome.published = published.id


def run(grid: Grid, settings: RunSettings) -> Outcome:
    home = Home(settings.home)
    fingerprint = None
    if settings.listen:
        if settings.no_tls and not is_loopback(split_address(settings.listen)[0]):
            raise HomeError(f"no-tls serves plaintext, so only on loopback; {settings.listen} is not")
        tls = None if settings.no_tls else load_server_tls(home)
        fingerprint = None if tls is None else tls.fingerprint
        coordinator = CoordinatorServer(home, settings.listen, tls)
        if settings.address == settings.listen and settings.listen.endswith(":0"):  # the port bound
            settings = dataclasses.replace(settings, address=f"{split_address(settings.listen)[0]}:{coordinator.port}")
    else:
        coordinator = Coordinator(home)
    coordinator.start()
    try:
        outcome = FlowerRun(grid, coordinator, settings, tls_fingerprint=fingerprint).run()
    finally:
        coordinator.stop()
    return outcome


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    log_to_stderr(log)
    outcome = run(grid, RunSettings.from_run_config(dict(context.run_config)))
    if outcome.published is not None:
        log.info("published ensemble %d; download it with `ddm-client download`", outcome.published)
    else:
        experts = ", ".join(map(str, outcome.open_experts)) or "none"
        failed = "; ".join(f"node {n}: {why}" for n, why in outcome.failed.items()) or "none"
        raise RuntimeError(
            f"no ensemble published: experts still open: {experts}; nodes that failed: {failed}."
            " Run `flwr run` again to resume the open experts"
        )
