"""The Flower ServerApp and ClientApp, driven in-process: a small Grid hands each train message
to the real ClientApp (or to a node that misbehaves) in a thread, with real siloed data, real
training of tiny experts, and a real coordinator home. The slow loopback deployment with a
SuperLink and SuperNodes is tests/e2e/test_flower.py."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load

from tests.flower import require_flower

require_flower()

# Every test here trains experts through a Flower run in threads: seconds each, 45 s in all.
pytestmark = pytest.mark.slow

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from client import flower_client  # noqa: E402
from client.island import expert_job, finished_checkpoint  # noqa: E402
from client.nodes import run_job  # noqa: E402
from client.state import IslandState  # noqa: E402
from coordinator import flower_server  # noqa: E402
from coordinator.bootstrap import InitOptions, init_home  # noqa: E402
from coordinator.home import Home, HomeBusy, HomeError  # noqa: E402
from coordinator.keys import SigningKey  # noqa: E402
from coordinator.registry import Registry  # noqa: E402
from coordinator.server import Coordinator  # noqa: E402
from ddm_model.train import TrainStopped  # noqa: E402
from protocol import ddm_pb2 as pb  # noqa: E402
from protocol.flower import CHECKPOINT, FILE, FORMAT, RECORD  # noqa: E402
from protocol.manifest import Manifest  # noqa: E402
from tests.e2e.conftest import free_port  # noqa: E402

STEPS = 12
Behaviour = Callable[[Message], "Message | None"]


class LocalGrid(Grid):
    """A Grid whose nodes are functions of a message, each run in its own thread as a SuperNode
    runs its ClientApp. A node's function may return None: it never answers."""

    def __init__(self, nodes: dict[int, Behaviour]):
        self.nodes = dict(nodes)
        self.replies: dict[str, Message] = {}
        self.sent: list[tuple[int, int]] = []  # (node id, expert id) of every train message
        self.threads: list[threading.Thread] = []
        self.answered: list[Message] = []  # every reply, taken or not
        self._lock = threading.Lock()

    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError

    def get_node_ids(self):
        with self._lock:
            return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id  # the SuperLink's job
            lease = pb.Lease.FromString(message.content.config_records[RECORD]["lease"])
            self.sent.append((message.metadata.dst_node_id, lease.expert_id))
            node = self.nodes[message.metadata.dst_node_id]
            thread = threading.Thread(target=self._deliver, args=(node, message_id, message), daemon=True)
            thread.start()
            self.threads.append(thread)
            ids.append(message_id)
        return ids

    def _deliver(self, node: Behaviour, message_id: str, message: Message) -> None:
        reply = node(message)
        if reply is not None:
            with self._lock:
                self.replies[message_id] = reply
                self.answered.append(reply)

    def pull_messages(self, message_ids):
        with self._lock:
            return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def join(self) -> None:
        for thread in self.threads:
            thread.join(60)

    def leave(self, node_id: int) -> None:
        with self._lock:
            del self.nodes[node_id]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread: the nodes train side by side in this process's threads, and a second
    intra-op thread each on a small, often busy machine slows them several times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What a SuperExec sets in the process that runs an app: messages are stamped with it."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def make_silos(root: Path, count: int) -> list[Path]:
    digits = load_digits()
    pixels = (digits.images / 16 * 255).round().astype(np.uint8)
    paths = []
    for k in range(count):
        path = root / f"site-{k}" / "images.npz"
        path.parent.mkdir(parents=True)
        np.savez(path, images=pixels[k::count][:300], labels=digits.target[k::count][:300])
        paths.append(path)
    return paths


@pytest.fixture
def home(tmp_path) -> Home:
    home, _ = init_home(
        InitOptions(
            home=tmp_path / "home",
            dataset="",
            mode="siloed",
            image_size=8,
            channels=1,
            experts=2,
            preset="tiny",
            steps=STEPS,
            batch_size=16,
            router_steps=10,
            router_samples=64,
            lease_seconds=2.0,
            heartbeat_seconds=1.0,
        )
    )
    return home


def site(tmp_path: Path, k: int, data: Path | None, upload: str | None = None) -> Behaviour:
    """A well-behaved node: the real ClientApp with its own node config."""
    config = {"state-dir": str(tmp_path / f"site-{k}" / "state")}
    if data is not None:
        config["data-dir"] = str(data)
    if upload is not None:
        config["upload"] = upload

    def behave(message: Message) -> Message:
        context = Context(run_id=1, node_id=k, node_config=config, state=RecordDict(), run_config={})
        return flower_client.app(message, context)

    return behave


def settings(home: Home, **overrides) -> flower_server.RunSettings:
    return flower_server.RunSettings(home=home.root, **{"poll_s": 0.05, "wait_for_nodes_s": 3.0, **overrides})


def signed_by(home: Home) -> dict[int, str]:
    registry = Registry(home.database_url(home.load_config()))
    try:
        return {e.id: json.loads(e.entry_json)["island_id"] for e in registry.experts() if e.state == "signed"}
    finally:
        registry.close()


def islands_of(home: Home) -> dict[int, str]:
    return {int(k): v["island"] for k, v in json.loads((home.root / flower_server.NODES_FILE).read_text()).items()}


def published_manifest(home: Home) -> dict:
    registry = Registry(home.database_url(home.load_config()))
    try:
        ensemble = registry.latest_published()
        assert ensemble is not None
        key = SigningKey.load(home.key_path)
        return Manifest.verified(ensemble.manifest_json, ensemble.signature, key.public_bytes)
    finally:
        registry.close()


def test_two_nodes_train_the_ensemble_and_it_is_published(home, tmp_path):
    silos = make_silos(tmp_path, 2)
    grid = LocalGrid({1: site(tmp_path, 1, silos[0]), 2: site(tmp_path, 2, silos[1])})
    outcome = flower_server.run(grid, settings(home))
    assert outcome.failed == {}
    assert sorted(outcome.signed) == [0, 1]
    assert outcome.published is not None and outcome.open_experts == []
    islands = islands_of(home)
    assert set(signed_by(home).values()) == {islands[1], islands[2]}  # each node signed one expert
    manifest = published_manifest(home)
    assert sorted(entry["expert_id"] for entry in manifest.entries) == [0, 1]
    assert sorted(grid.sent) == [(1, 0), (2, 1)]


def garbage(message: Message) -> Message:
    """Random bytes declared as a checkpoint, with their true sha256."""
    data = np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    content = RecordDict(
        {
            RECORD: ConfigRecord({"format": FORMAT, "sha256": hashlib.sha256(data).hexdigest()}),
            CHECKPOINT: ArrayRecord({FILE: flower_server.raw_array(data)}),
        }
    )
    return Message(content, reply_to=message)


def failing(message: Message) -> Message:
    return Message(Error(code=0, reason="ClientApp raised: out of memory"), reply_to=message)


def foreign(message: Message) -> Message:
    return Message(RecordDict({"metrics": ConfigRecord({"accuracy": 0.9})}), reply_to=message)


@pytest.mark.parametrize("bad", [garbage, failing, foreign], ids=["garbage", "error", "foreign"])
def test_a_node_answering_garbage_loses_its_lease_and_another_node_trains_its_expert(home, tmp_path, bad):
    silos = make_silos(tmp_path, 2)
    grid = LocalGrid({1: bad, 2: site(tmp_path, 2, silos[1])})
    outcome = flower_server.run(grid, settings(home))
    assert list(outcome.failed) == [1]
    assert outcome.published is not None
    islands = islands_of(home)
    assert set(signed_by(home).values()) == {islands[2]}  # the good node trained both experts
    assert sorted(grid.sent) == [(1, 0), (2, 0), (2, 1)] or sorted(grid.sent) == [(1, 0), (2, 1), (2, 0)]
    registry = Registry(home.database_url(home.load_config()))
    try:
        released = [e for e in registry.events(kind="lease_released") if e.island_id == islands[1]]
        assert len(released) == 1
        if bad is garbage:
            uploads = registry.snapshot()["uploads"]
            assert [u["state"] for u in uploads if u["island_id"] == islands[1]] == ["rejected"]
    finally:
        registry.close()


@pytest.mark.parametrize("fault", ["leaves", "late"])
def test_a_node_that_leaves_or_answers_late_does_not_block_the_run(home, tmp_path, fault):
    silos = make_silos(tmp_path, 2)
    answer = threading.Event()

    def late(message: Message) -> Message | None:
        reply = site(tmp_path, 1, silos[0])(message)
        answer.wait(60)  # answers only after the run has given its expert to another node
        return reply

    grid = LocalGrid({1: late, 2: site(tmp_path, 2, silos[1])})
    if fault == "leaves":
        threading.Timer(0.5, grid.leave, args=(1,)).start()
    outcome = flower_server.run(grid, settings(home, expert_timeout_s=6.0))
    answer.set()
    grid.join()
    assert outcome.published is not None
    assert list(outcome.failed) == [1]
    why = "the node left the federation" if fault == "leaves" else "no reply within 6 s"
    assert why in outcome.failed[1]
    islands = islands_of(home)
    assert set(signed_by(home).values()) == {islands[2]}
    registry = Registry(home.database_url(home.load_config()))
    try:
        assert not [u for u in registry.snapshot()["uploads"] if u["island_id"] == islands[1]]
    finally:
        registry.close()


def test_a_rerun_trains_only_the_open_experts(home, tmp_path):
    silos = make_silos(tmp_path, 3)
    first = LocalGrid({1: site(tmp_path, 1, silos[0]), 2: lambda message: None})
    # Node 1 trains one expert, then leaves; node 2 leaves without an answer: one expert stays open.
    original = first._deliver

    def deliver_then_leave(node, message_id, message):
        original(node, message_id, message)
        if node is first.nodes.get(1):
            first.leave(1)

    first._deliver = deliver_then_leave
    threading.Timer(0.5, first.leave, args=(2,)).start()
    outcome = flower_server.run(first, settings(home, wait_for_nodes_s=1.0))
    assert outcome.published is None
    assert len(outcome.open_experts) == 1
    (done,) = signed_by(home)
    with pytest.raises(RuntimeError, match="experts still open"):
        # The ServerApp's main says so in one error: the run did not publish.
        grid = LocalGrid({})
        context = Context(
            run_id=2,
            node_id=0,
            node_config={},
            state=RecordDict(),
            run_config={"home": str(home.root), "wait-for-nodes-s": 0.2, "poll-s": 0.05},
        )
        flower_server.app(grid, context)

    second = LocalGrid({3: site(tmp_path, 3, silos[2])})
    outcome = flower_server.run(second, settings(home))
    assert outcome.published is not None
    assert second.sent == [(3, outcome.signed[0])]  # only the open expert went out
    assert outcome.signed[0] != done
    islands = islands_of(home)
    assert signed_by(home) == {done: islands[1], outcome.signed[0]: islands[3]}


def test_the_client_app_refuses_a_lease_its_data_does_not_fit(home, tmp_path):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((20, 16, 16), np.uint8), labels=np.zeros(20, np.int64))
    silos = make_silos(tmp_path, 1)
    grid = LocalGrid({1: site(tmp_path, 1, wrong), 2: site(tmp_path, 9, None), 3: site(tmp_path, 3, silos[0])})
    outcome = flower_server.run(grid, settings(home))
    assert outcome.published is not None
    assert "does not fit the model" in outcome.failed[1]
    assert "16x16" not in outcome.failed[1]  # the coordinator hears that it does not fit, not what it is
    assert "no data configured" in outcome.failed[2]


def test_a_finished_checkpoint_is_answered_again_without_training(home, tmp_path):
    """A rerun's message for an expert the node already finished: the same file, at once."""
    silos = make_silos(tmp_path, 1)
    coordinator = Coordinator(home)
    try:
        token = coordinator.registry.create_invite("island", 60)
        island, _ = coordinator.registry.redeem_invite(token, "x")
        grant = coordinator.registry.acquire_lease(island.id)
        lease = coordinator.service.lease_message(grant)
    finally:
        coordinator.stop()
    message = Message(flower_server.train_message(lease, None), dst_node_id=1, message_type="train.expert")
    node = site(tmp_path, 1, silos[0])
    first = node(message).content[CHECKPOINT][FILE].data
    (out,) = (tmp_path / "site-1" / "state" / "outbox").glob("expert-*.safetensors")
    inode = out.stat().st_ino
    again = node(message).content[CHECKPOINT][FILE].data
    assert again == first
    assert out.stat().st_ino == inode  # answered from the outbox: a new training would have replaced the file


def answers(grid: LocalGrid) -> list[dict]:
    return [dict(reply.content.config_records[RECORD]) for reply in grid.answered]


def answering_late(node: Behaviour, seconds: float) -> Behaviour:
    """``node``, each of its replies held back ``seconds`` after it is made."""

    def behave(message: Message) -> Message | None:
        reply = node(message)
        time.sleep(seconds)
        return reply

    return behave


@pytest.mark.parametrize("how", ["port", "port-late-reply", "unreachable", "reply"])
def test_a_node_uploads_through_ddms_port_when_offered_and_reachable(home, tmp_path, how):
    """With ``listen`` the ServerApp serves ddm's port (TLS, pinned through the message): a node
    uploads there and answers with the digest; a node that cannot reach it, or whose operator
    says upload="reply", answers with the checkpoint. A reply that comes several polls after the upload
    completed the lease (port-late-reply) is no failure of the node: its expert is signed."""
    silos = make_silos(tmp_path, 1)
    listen = "127.0.0.1:0"
    address = f"127.0.0.1:{free_port()}" if how == "unreachable" else ""  # nothing listens there
    node = site(tmp_path, 1, silos[0], upload="reply" if how == "reply" else None)
    if how == "port-late-reply":
        node = answering_late(node, 20 * settings(home).poll_s)
    grid = LocalGrid({1: node})
    outcome = flower_server.run(grid, settings(home, listen=listen, address=address or listen))
    assert outcome.published is not None and outcome.failed == {}
    grid.join()  # the last reply may come after the run: its expert was signed through the port
    replies = answers(grid)
    assert len(replies) == 2
    if how.startswith("port"):
        assert all("uploaded" in r and CHECKPOINT not in r for r in replies)
        assert all(not reply.content.array_records for reply in grid.answered)  # no checkpoint in the reply
    else:
        assert all("sha256" in r and "uploaded" not in r for r in replies)
    island = islands_of(home)[1]
    registry = Registry(home.database_url(home.load_config()))
    try:
        (row,) = [i for i in registry.snapshot()["islands"] if i["id"] == island]
        # Bytes that came through ddm's port are counted there; the Flower reply's are not.
        assert row["bytes_received"] > 0  # the upload path took the checkpoint either way
        assert (row["checkpoint_message_bytes"] > 0) == how.startswith("port")
    finally:
        registry.close()


def test_the_app_directory_names_the_installed_apps_and_this_home(home, tmp_path):
    from coordinator.flower_project import RunSettings, write_app

    path = write_app(tmp_path / "app", RunSettings(home=home.root, expert_timeout_s=60.0))
    import tomllib

    project = tomllib.loads(path.read_text())
    components = project["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "coordinator.flower_server:app", "clientapp": "client.flower_client:app"}
    config = project["tool"]["flwr"]["app"]["config"]
    assert config["home"] == str(home.root) and config["expert-timeout-s"] == 60.0
    assert flower_server.RunSettings.from_run_config(config) == RunSettings(home=home.root, expert_timeout_s=60.0)
    (tmp_path / "app" / "extra.py").write_text("")
    with pytest.raises(HomeError, match="holds other files"):
        write_app(tmp_path / "app", RunSettings(home=home.root))


def test_a_damaged_node_table_is_one_clear_error_and_changes_nothing(home, tmp_path):
    table = home.root / flower_server.NODES_FILE
    table.write_text('{"1": "not an object"}')
    with pytest.raises(HomeError, match=r"flower-nodes\.json is damaged"):
        flower_server.run(LocalGrid({}), settings(home))
    assert table.read_text() == '{"1": "not an object"}'


class StopAt:
    """A stop flag that is set once training reports ``step``."""

    def __init__(self, step: int):
        self.step = step
        self.reached = False

    def update(self, step: int, loss: float, rate: float) -> None:
        self.reached = self.reached or step >= self.step

    def is_set(self) -> bool:
        return self.reached


def test_a_node_restarted_mid_training_resumes_and_answers_the_same_checkpoint(home, tmp_path, monkeypatch):
    """The node's training stops halfway (a restart), then the lease comes again: it resumes from
    its state folder and answers exactly the checkpoint an uninterrupted node trains."""
    silos = make_silos(tmp_path, 1)
    coordinator = Coordinator(home)
    try:
        token = coordinator.registry.create_invite("island", 60)
        island, _ = coordinator.registry.redeem_invite(token, "x")
        lease = coordinator.service.lease_message(coordinator.registry.acquire_lease(island.id))
    finally:
        coordinator.stop()
    message = Message(flower_server.train_message(lease, None), dst_node_id=1, message_type="train.expert")

    settings_ = flower_client.NodeSettings(data_dir=str(silos[0]), state_dir=tmp_path / "restarted")
    state = IslandState(settings_.state_dir)
    data = flower_client.node_data(message, lease, state, settings_)
    out, _ = finished_checkpoint(lease, state, data)
    stop = StopAt(STEPS // 2)
    with pytest.raises(TrainStopped):
        run_job(expert_job(lease, state, data, out), data, on_progress=stop.update, stop=stop)
    assert any(state.work(lease.expert_id).iterdir()) and not out.exists()  # resume state, no checkpoint

    resumed = site(tmp_path, 1, silos[0])
    restarted = {"state-dir": str(tmp_path / "restarted"), "data-dir": str(silos[0])}
    context = Context(run_id=2, node_id=1, node_config=restarted, state=RecordDict(), run_config={})
    steps = []
    step = torch.optim.AdamW.step

    def counted(self, *args, **kwargs):
        steps.append(1)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    after_restart = load(flower_client.app(message, context).content[CHECKPOINT][FILE].data)
    left = len(steps)
    assert 0 < left < STEPS  # the steps after the saved resume state, not the whole training again
    uninterrupted = load(resumed(message).content[CHECKPOINT][FILE].data)
    assert len(steps) == left + STEPS
    assert after_restart.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(after_restart[name], tensor), name


def test_shared_mode_nodes_train_on_the_shard_the_message_carries_and_pass_the_probe(tmp_path):
    """Shared mode: the coordinator holds the data; each message carries its cluster's shard,
    checked by the node against the lease's fingerprint, and each reply is scored on the
    cluster's held-out probe slice before it is signed, as every upload is."""
    home, _ = init_home(
        InitOptions(
            home=tmp_path / "home", experts=2, preset="tiny", steps=60, batch_size=32, router_steps=10,
            clustering="random",
        )
    )  # fmt: skip
    grid = LocalGrid({1: site(tmp_path, 1, None), 2: site(tmp_path, 2, None)})
    outcome = flower_server.run(grid, settings(home))
    assert outcome.published is not None and outcome.failed == {}
    manifest = published_manifest(home)
    assert all(entry["probe"]["loss"] < entry["probe"]["untrained_loss"] for entry in manifest.entries)
    assert all(entry["data_fingerprint"] for entry in manifest.entries)  # trained on the cluster's shard


def test_a_sqlite_home_served_by_another_process_is_one_clear_error(home):
    """SQLite: one process works a home at a time, `serve` or a Flower run (PostgreSQL: several)."""
    holder = Coordinator(home)
    try:
        with pytest.raises(HomeBusy, match="is already serving"):
            flower_server.run(LocalGrid({}), settings(home))
    finally:
        holder.stop()
