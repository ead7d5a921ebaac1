"""Every field of every RPC, fuzzed against a real coordinator.

Each example must end in a status allowed for what it sent (never INTERNAL or UNKNOWN, never a
hang), a refusal must say why in one short printable line, and a refusal must leave the
registry as it was (see harness.VOLATILE_ISLAND_COLUMNS for the columns any authenticated call
may touch). An accepted call may change only what that call is for.

Each test fuzzes as its own enrolled island, so per-island limits of one test do not spill
into another, and keeps its call volume modest.

Which status is right: a field that breaks a rule adds that rule's status to the allowed set
(the coordinator may check rules in any order). A field that is well-formed but implausible
(an id not shaped like an id, a string longer than any real value, a negative offset) also
allows INVALID_ARGUMENT, the status of the bounds every message field must respect; a string
of more than 64 Ki characters, past any bound, must end in INVALID_ARGUMENT. A message larger
than the server accepts allows RESOURCE_EXHAUSTED, from gRPC itself.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
from grpc import StatusCode as S
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol import ddm_pb2 as pb
from protocol.bounds import BOUNDS
from protocol.limits import MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES, MIN_CHUNK_BYTES

from .conftest import OPEN_UPLOAD_BYTES, enroll
from .harness import (
    OK,
    REQUEST,
    Wire,
    assert_changes_within,
    assert_unchanged,
    check,
    diff,
    id_shaped,
    registry_state,
    sha256_shaped,
    short,
    tree,
)
from .strategies import FUZZ, Huge, blobs, doubles, ids, int64s, real, sha256s, strings, undecodable, unknown_fields

OWN, VICTIM = "<own>", "<victim's>"  # stand-ins, resolved to real ids inside a test


@pytest.fixture(scope="module")
def own(server):
    """own(name, lease=False): this module's island for one test, enrolled on first use."""
    cache = {}

    def get(name: str, lease: bool = False):
        if name not in cache:
            cache[name] = enroll(server, lease=lease, name=f"fuzz-{name}")
        return cache[name]

    return get


def plausible(text: str, limit: int = 40) -> bool:
    """A string no bound on a free-form field would refuse."""
    return len(text) <= limit and text.isprintable()


def too_large(*messages) -> bool:
    return any(m.ByteSize() > MAX_MESSAGE_BYTES for m in messages)


def refusal(*codes: S, when: bool = True) -> dict:
    return dict.fromkeys(codes) if when else {}


def oversize(*messages) -> dict:
    return {S.RESOURCE_EXHAUSTED: "larger than max"} if too_large(*messages) else {}


# Characters no string field of the protocol has a use for: past any bound, so such a field
# must be refused as INVALID_ARGUMENT, whatever else is right or wrong with the call.
BEYOND_ANY_BOUND = 64 * 1024


def bounded(allowed: dict, request) -> dict:
    """``allowed``, unless the request (a stream's first message: the one the coordinator
    reads before it refuses) holds a string beyond any bound."""
    first = (request[0] if request else None) if isinstance(request, list) else request
    if first is not None and any(isinstance(v, str) and len(v) > BEYOND_ANY_BOUND for _, v in first.ListFields()):
        return {S.INVALID_ARGUMENT: None, **oversize(first)}
    return allowed


def pick(choice: str, own_value: str, victim_value: str) -> str:
    return {OWN: own_value, VICTIM: victim_value}.get(choice, real(choice))


def attempt(server, island, method, request, allowed, what, accepted=None):
    """Call; check the status and the details; a refusal changes nothing, an accepted call
    is checked by ``accepted(reply, changes)``."""
    allowed = bounded(allowed, request)
    before = registry_state(server)
    outcome = island.call(method, request)
    check(outcome, allowed, what)
    if outcome.code == OK:
        accepted(outcome.reply, diff(before, registry_state(server)))
    else:
        assert_unchanged(server, before, what)
    return outcome


# -- Enroll ------------------------------------------------------------------------------------


@FUZZ
@given(kind=st.sampled_from(["fresh", "used", "expired", "random"]), random_token=strings(), name=strings(60))
@example(kind="fresh", random_token="", name=Huge("a", 100_000))
@example(kind="random", random_token=Huge("a", 100_000), name="x")
def test_enroll(server, own, kind, random_token, name):
    random_token, name = real(random_token), real(name)
    holder = own("enroll-used")
    token = {
        "fresh": lambda: server.registry.create_invite("island", 600),
        "used": lambda: holder.extra["token"],
        "expired": lambda: server.registry.create_invite("island", -1),
        "random": lambda: random_token,
    }[kind]()
    request = pb.EnrollRequest(token=token, name=name)
    what = f"Enroll({kind} token {short(token)}, name={short(name)})"
    odd = not plausible(name) or not plausible(token, 64)
    if kind == "fresh":
        allowed = {OK: None, S.INVALID_ARGUMENT: None}
    else:
        word = {"used": "already used", "expired": "expired", "random": None}[kind]
        allowed = {S.UNAUTHENTICATED: word, **refusal(S.INVALID_ARGUMENT, when=odd)}
    allowed.update(oversize(request))

    def accepted(reply, changes):
        assert_changes_within(
            changes, {("invites", None, "used_at"), ("invites", None, "island_id"), ("islands", None, "+row")}, what
        )
        island = registry_state(server)["islands"][reply.island_id]
        assert len(island["name"]) <= 200 and island["role"] == "island", what
        Wire(server.address, reply.credential).close()

    anonymous = Wire(server.address)
    try:
        attempt(server, anonymous, "Enroll", request, allowed, what, accepted)
    finally:
        anonymous.close()


# -- leases ------------------------------------------------------------------------------------


@FUZZ
@given(local_dataset=strings())
@example(local_dataset=Huge("a", 100_000))
def test_acquire_lease(server, own, local_dataset):
    me = own("acquire", lease=True)
    local_dataset = real(local_dataset)
    request = pb.AcquireLeaseRequest(local_dataset=local_dataset)
    what = f"AcquireLease(local_dataset={short(local_dataset)})"

    def accepted(reply, changes):
        assert reply.lease.lease_id == me.lease.lease_id, what  # the island's own lease, renewed
        assert_changes_within(changes, {("leases", me.lease.lease_id, "deadline_at")}, what)

    allowed = {OK: None, S.INVALID_ARGUMENT: None, **oversize(request)}
    attempt(server, me, "AcquireLease", request, allowed, what, accepted)


def sane_progress(step: int, loss: float, rate: float) -> bool:
    """Progress an island can really report: a step count, a mean square loss (NaN before the
    first log window), a rate; the limits are protocol/bounds.py's."""
    limits = BOUNDS["HeartbeatRequest"]
    return (
        0 <= step <= limits["step"].max
        and (math.isnan(loss) or (math.isfinite(loss) and loss >= 0))
        and math.isfinite(rate)
        and 0 <= rate <= limits["images_per_second"].max
    )


@FUZZ
@given(lease=st.one_of(st.sampled_from([OWN, VICTIM]), ids()), step=int64s(), loss=doubles(), rate=doubles())
@example(lease=OWN, step=-1, loss=0.5, rate=1.0)
@example(lease=OWN, step=1, loss=math.inf, rate=1.0)
@example(lease=OWN, step=1, loss=0.5, rate=-1.0)
@example(lease=OWN, step=1, loss=0.5, rate=math.nan)
@example(lease=Huge("a", 100_000), step=1, loss=0.5, rate=1.0)
def test_heartbeat(server, own, victim, lease, step, loss, rate):
    me = own("heartbeat", lease=True)
    lease_id = pick(lease, me.lease.lease_id, victim.lease.lease_id)
    request = pb.HeartbeatRequest(lease_id=lease_id, step=step, loss=loss, images_per_second=rate)
    what = f"Heartbeat(lease={short(lease)}, step={step}, loss={loss}, images_per_second={rate})"
    odd = not sane_progress(step, loss, rate)
    if lease == OWN:
        allowed = {OK: None, S.INVALID_ARGUMENT: None}
    else:
        allowed = {S.PERMISSION_DENIED: "not held", **refusal(S.INVALID_ARGUMENT, when=odd or not id_shaped(lease_id))}
    allowed.update(oversize(request))
    expert_id = me.lease.expert_id

    def accepted(reply, changes):
        assert_changes_within(
            changes,
            {("leases", lease_id, "deadline_at"), ("leases", lease_id, "last_heartbeat_at")}
            | {("experts", expert_id, c) for c in ("step", "loss", "images_per_second", "updated_at", "state")},
            what,
        )
        stored = registry_state(server)["experts"][expert_id]
        # What an accepted heartbeat stores is what status shows: a step, a loss and a rate
        # that mean something (a NaN loss is "not measured yet").
        assert stored["step"] == step and step >= 0, f"{what}: stored step {stored['step']}"
        assert stored["loss"] is None or math.isfinite(stored["loss"]), f"{what}: stored loss {stored['loss']}"
        ips = stored["images_per_second"]
        assert ips is None or (math.isfinite(ips) and ips >= 0), f"{what}: stored images_per_second {ips}"

    attempt(server, me, "Heartbeat", request, allowed, what, accepted)


@FUZZ
@given(lease=st.one_of(st.sampled_from([OWN, VICTIM]), ids()), reason=strings())
@example(lease=OWN, reason=Huge("a", 100_000))
@example(lease=Huge("a", 100_000), reason="")
def test_release_lease(server, own, victim, lease, reason):
    me = own("release", lease=True)
    if server.registry.lease(me.lease.lease_id).state != "active":  # an earlier example released it
        me.lease = me.ok("AcquireLease", pb.AcquireLeaseRequest()).lease
    reason = real(reason)
    lease_id = pick(lease, me.lease.lease_id, victim.lease.lease_id)
    request = pb.ReleaseLeaseRequest(lease_id=lease_id, reason=reason)
    what = f"ReleaseLease(lease={short(lease)}, reason={short(reason)})"
    odd = not plausible(reason)
    if lease == OWN:
        allowed = {OK: None, S.INVALID_ARGUMENT: None}
    else:
        allowed = {S.PERMISSION_DENIED: "not held", **refusal(S.INVALID_ARGUMENT, when=odd or not id_shaped(lease_id))}
    allowed.update(oversize(request))
    expert_id = me.lease.expert_id

    def accepted(reply, changes):
        assert_changes_within(
            changes,
            {("leases", lease_id, "state"), ("experts", expert_id, "state"), ("experts", expert_id, "updated_at")},
            what,
        )
        assert registry_state(server)["leases"][lease_id]["state"] == "released", what
        again = me.ok("AcquireLease", pb.AcquireLeaseRequest())  # the same expert comes back
        assert again.lease.expert_id == expert_id, what
        me.lease = again.lease

    attempt(server, me, "ReleaseLease", request, allowed, what, accepted)


# -- uploads -----------------------------------------------------------------------------------


@FUZZ
@given(
    lease=st.one_of(st.sampled_from([OWN, VICTIM]), ids()),
    size=st.one_of(int64s(), st.sampled_from(["quota", "quota+1"])),
    sha256=sha256s(),
)
@example(lease=Huge("a", 100_000), size=1, sha256="ab" * 32)
def test_begin_upload(server, own, victim, lease, size, sha256):
    me = own("begin", lease=True)
    sha256 = real(sha256)
    quota = server.config.max_upload_bytes
    size = {"quota": quota, "quota+1": quota + 1}.get(size, size)
    lease_id = pick(lease, me.lease.lease_id, victim.lease.lease_id)
    request = pb.BeginUploadRequest(lease_id=lease_id, size=size, sha256=sha256)
    what = f"BeginUpload(lease={short(lease)}, size={size}, sha256={short(sha256)})"
    allowed = {
        **refusal(S.INVALID_ARGUMENT, when=not sha256_shaped(sha256) or size <= 0 or size > quota),
        **({S.RESOURCE_EXHAUSTED: "quota"} if size > quota else {}),
        **refusal(S.PERMISSION_DENIED, when=lease != OWN),
        **refusal(S.INVALID_ARGUMENT, when=lease not in (OWN, VICTIM) and not id_shaped(lease_id)),
        **oversize(request),
    }
    if not allowed:
        allowed = {OK: None}
    staged = tree(server.store.staging)

    def accepted(reply, changes):
        assert (reply.size, reply.sha256, reply.state) == (size, sha256, "open"), what
        assert_changes_within(
            changes,
            {("uploads", None, c) for c in ("+row", "state", "reason", "updated_at", "lease_id")}
            | {("experts", me.lease.expert_id, "state"), ("leases", lease_id, "deadline_at")},
            what,
        )

    attempt(server, me, "BeginUpload", request, allowed, what, accepted)
    assert tree(server.store.staging) == staged, f"{what}: staging changed"


def chunk_refusals(chunk: pb.UploadChunk, own_upload: pb.UploadState, own_id: str) -> dict:
    """The statuses a first chunk may end its stream with (every chunk here is refused)."""
    n, odd_sha = len(chunk.data), not sha256_shaped(chunk.sha256)
    odd_chunk = chunk.offset < 0 or n == 0 or n > MAX_CHUNK_BYTES or odd_sha
    allowed = oversize(chunk)
    if chunk.upload_id != own_id:
        allowed[S.NOT_FOUND] = "no upload"
        allowed.update(refusal(S.INVALID_ARGUMENT, when=odd_chunk or not id_shaped(chunk.upload_id)))
        return allowed
    end, size = chunk.offset + n, own_upload.size
    if chunk.offset != own_upload.committed_offset:
        allowed[S.FAILED_PRECONDITION] = "committed offset"
    if odd_chunk or (n < MIN_CHUNK_BYTES and end != size) or end > size:
        allowed[S.INVALID_ARGUMENT] = None
    if hashlib.sha256(chunk.data).hexdigest() != chunk.sha256:
        allowed[S.DATA_LOSS] = "checksum"
        allowed.update(refusal(S.INVALID_ARGUMENT, when=odd_sha))
    assert allowed, "a fuzzed chunk must never be a valid one"
    return allowed


CORRECT = "<its sha256>"


def chunks():
    """(upload id, offset, data, sha256) of one chunk, as stand-ins."""
    return st.tuples(
        st.one_of(st.sampled_from([OWN, VICTIM]), ids()), int64s(), blobs(), st.one_of(st.just(CORRECT), sha256s())
    )


@FUZZ
@given(stream=st.lists(chunks(), max_size=3))
@example(stream=[(Huge("a", 100_000), 0, b"x", CORRECT)])
@example(stream=[(OWN, 0, b"x", Huge("a", 100_000))])
def test_upload_chunks(server, own, victim, stream):
    me = own("chunks", lease=True)
    if "upload" not in me.extra:
        me.extra["upload"] = me.ok(
            "BeginUpload", pb.BeginUploadRequest(lease_id=me.lease.lease_id, size=OPEN_UPLOAD_BYTES, sha256="ab" * 32)
        )
    upload = me.extra["upload"]
    messages = []
    for upload_choice, offset, data, sha256 in stream:
        data = real(data)
        messages.append(
            pb.UploadChunk(
                upload_id=pick(upload_choice, upload.upload_id, victim.extra["upload"].upload_id),
                offset=offset,
                data=data,
                sha256=hashlib.sha256(data).hexdigest() if sha256 == CORRECT else real(sha256),
            )
        )
    what = f"UploadChunks({stream})"
    if messages:
        allowed = chunk_refusals(messages[0], upload, upload.upload_id)
    else:
        allowed = {S.INVALID_ARGUMENT: "at least one chunk"}
    staged = tree(server.store.staging)
    attempt(server, me, "UploadChunks", messages, allowed, what)
    assert tree(server.store.staging) == staged, f"{what}: staging changed"


def upload_tests(name: str):
    """QueryUpload and CompleteUpload on the island's own open upload, another island's, or
    an id of anything."""

    @FUZZ
    @given(target=st.one_of(st.sampled_from([OWN, VICTIM]), ids()))
    @example(target=Huge("a", 100_000))
    def test(server, own, victim, target):
        me = own(name, lease=True)
        if "upload" not in me.extra:
            me.extra["upload"] = me.ok(
                "BeginUpload",
                pb.BeginUploadRequest(lease_id=me.lease.lease_id, size=OPEN_UPLOAD_BYTES, sha256="cd" * 32),
            )
        upload = me.extra["upload"]
        upload_id = pick(target, upload.upload_id, victim.extra["upload"].upload_id)
        request = REQUEST[name](upload_id=upload_id)
        what = f"{name}(upload_id={short(target)})"
        if target == OWN:
            allowed = {OK: None} if name == "QueryUpload" else {S.FAILED_PRECONDITION: "only 0 of"}
        else:
            allowed = {S.NOT_FOUND: "no upload", **refusal(S.INVALID_ARGUMENT, when=not id_shaped(upload_id))}
        allowed.update(oversize(request))

        def accepted(reply, changes):
            assert not changes, f"{what}: the registry changed: {short(changes)}"
            assert (reply.upload_id, reply.committed_offset, reply.size) == (upload_id, 0, OPEN_UPLOAD_BYTES), what

        attempt(server, me, name, request, allowed, what, accepted)

    test.__name__ = f"test_{name}"
    return test


test_query_upload = upload_tests("QueryUpload")
test_complete_upload = upload_tests("CompleteUpload")


# -- the ensemble, downloads, status -----------------------------------------------------------


@FUZZ
@given(
    target=st.one_of(st.sampled_from(["own shard", "OWN SHARD", "victim's shard", "clustering"]), sha256s()),
    offset=st.one_of(int64s(), st.sampled_from(["size", "size+1", "size-1"])),
)
@example(target=Huge("a", 100_000), offset=0)
def test_download(server, own, victim, target, offset):
    me = own("download", lease=True)
    shard = me.lease.shard.sha256
    sha256 = {
        "own shard": shard,
        "OWN SHARD": shard.upper(),
        "victim's shard": victim.lease.shard.sha256,
        "clustering": server.config.clustering["sha256"],
    }.get(target, real(target))
    size = me.lease.shard.size
    offset = {"size": size, "size+1": size + 1, "size-1": size - 1}.get(offset, offset)
    request = pb.DownloadRequest(sha256=sha256, offset=offset)
    what = f"Download({short(target)}, offset={offset})"
    odd_offset = refusal(S.INVALID_ARGUMENT, when=not 0 <= offset <= BOUNDS["DownloadRequest"]["offset"].max)
    if sha256 == shard:
        allowed = {OK: None} if 0 <= offset <= size else {S.OUT_OF_RANGE: "outside", **odd_offset}
    elif sha256 in (victim.lease.shard.sha256, server.config.clustering["sha256"]):
        allowed = {S.PERMISSION_DENIED: None, **odd_offset}
    else:
        allowed = {S.NOT_FOUND: None, **refusal(S.INVALID_ARGUMENT, when=bool(odd_offset) or not sha256_shaped(sha256))}
    allowed.update(oversize(request))

    def accepted(reply, changes):
        assert not changes, f"{what}: the registry changed: {short(changes)}"
        data = b"".join(c.data for c in reply)
        assert data == server.store.path(shard).read_bytes()[offset:], what

    attempt(server, me, "Download", request, allowed, what, accepted)


@FUZZ
@given(payload=unknown_fields())
def test_get_manifest_and_status_skip_unknown_fields(server, own, payload):
    """Messages with no fields of their own: fuzzed with fields they do not define."""
    me = own("empty-messages")
    what, payload = f"({payload})", real(payload)
    big = {S.RESOURCE_EXHAUSTED: "larger than max"} if len(payload) > MAX_MESSAGE_BYTES else {}
    before = registry_state(server)
    outcome = me.wire.raw("GetManifest", payload)
    check(outcome, {S.NOT_FOUND: "no ensemble", **big}, f"GetManifest{what}")
    outcome = me.wire.raw("Status", payload)
    check(outcome, {OK: None, **big}, f"Status{what}")
    if outcome.code == OK:
        assert json.loads(pb.StatusReply.FromString(outcome.reply).json)["experts"]
    assert_unchanged(server, before, what)


def _no_constants(name: str):
    raise AssertionError(f"status JSON holds {name}, which is not JSON")


# -- bytes that are not a message, and callers that are not who they say -----------------------


@pytest.mark.parametrize("method", sorted(REQUEST))
@settings(FUZZ, max_examples=12)
@given(data=st.data())
def test_undecodable_requests_are_invalid_arguments(server, own, method, data):
    me = own("undecodable", lease=True)
    payload = real(data.draw(undecodable(REQUEST[method]), label="payload"))
    wire = Wire(server.address) if method == "Enroll" else me.wire
    before = registry_state(server)
    outcome = wire.raw(method, [payload] if method == "UploadChunks" else payload)
    if method == "Enroll":
        wire.close()
    check(outcome, {S.INVALID_ARGUMENT: None}, f"{method}({short(payload)})")
    assert_unchanged(server, before, method)


AUTHENTICATED = sorted(set(REQUEST) - {"Enroll"})
ISLAND_ONLY = sorted(set(AUTHENTICATED) - {"GetManifest", "Download", "Status"})
ASCII = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)


@FUZZ
@given(
    method=st.sampled_from(AUTHENTICATED),
    who=st.sampled_from(["random", "bearer random", "own id, wrong secret", "victim's id, random secret", "reader"]),
    text=ASCII,
)
def test_callers_without_a_valid_credential_are_refused(server, own, victim, method, who, text):
    me = own("credentials")
    reader = own("reader-credentials")
    if "reader" not in reader.extra:
        reader.extra["reader"] = enroll(server, role="reader", name="fuzz-reader")
    credential = {
        "random": None,
        "bearer random": "Bearer " + text,
        "own id, wrong secret": f"Bearer {me.id}.{text}",
        "victim's id, random secret": f"Bearer {victim.id}.{text or 'x'}",
        "reader": "Bearer " + reader.extra["reader"].credential,
    }[who]
    metadata = (("authorization", credential if credential is not None else text),)
    what = f"{method} as {who} ({short(text)})"
    if who == "reader":
        if method not in ISLAND_ONLY:
            return  # readers may call it; not a refusal to test here
        allowed = {S.PERMISSION_DENIED: "reader"}
    else:
        allowed = {S.UNAUTHENTICATED: "credential"}
    request = REQUEST[method]()
    before = registry_state(server)
    outcome = me.wire.call(method, [request] if method == "UploadChunks" else request, metadata=metadata)
    check(outcome, allowed, what)
    assert_unchanged(server, before, what)


def test_status_is_strict_json_after_all_that(server, own):
    """Whatever the fuzzing above stored, status still reads as JSON (no NaN, no Infinity)."""
    me = own("status")
    report = json.loads(me.ok("Status", pb.StatusRequest()).json, parse_constant=_no_constants)
    assert report["experts"]
