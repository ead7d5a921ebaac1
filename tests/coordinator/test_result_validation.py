"""Result validation before credit, over the real gRPC upload path: in shared mode an expert is
scored on its cluster's held-out probe slice and refused unless it beats an untrained model of
the same config by the configured margin. The probe slice reaches no island."""

import json

import numpy as np
import pytest
import torch

from client.island import fetch_data
from client.state import IslandState
from ddm_model.checkpoint import save_checkpoint
from ddm_model.clustering import Clustering
from ddm_model.data import load_dataset_file
from ddm_model.dit import DiTConfig
from ddm_model.probe import untrained_model
from protocol import ddm_pb2 as pb

from .conftest import STEPS
from .test_service import complete_rejected, enroll, lease_for


def test_probe_ids_reach_no_shard_and_no_index_list(server, tmp_path):
    clustering = Clustering.load(server.home.clustering_path)
    summary = server.config.clustering["probe"]
    for k in range(server.config.experts):
        conn, _ = enroll(server)
        lease = lease_for(conn)  # a shard
        held = load_dataset_file(server.home.probe_path(k), expect_fingerprint=summary["fingerprints"][k])
        assert len(held) == summary["sizes"][k] >= 16
        shard = fetch_data(conn, lease, IslandState(tmp_path / f"island-{k}"), None)
        again = conn.unary("AcquireLease", pb.AcquireLeaseRequest(local_dataset="digits")).lease
        assert again.lease_id == lease.lease_id and again.WhichOneof("data") == "index_list"
        cluster = lease.cluster_id
        probe_ids, shard_ids = held.ids.numpy(), shard.ids.numpy()
        assert np.intersect1d(probe_ids, shard_ids).size == 0
        assert np.intersect1d(probe_ids, np.asarray(again.index_list.ids)).size == 0
        assert list(again.index_list.ids) == shard_ids.tolist()
        assert np.array_equal(np.sort(np.concatenate([shard_ids, probe_ids])), clustering.members(cluster))
        # The fingerprint an island proves covers the training part only.
        assert shard.fingerprint() == lease.shard_fingerprint == again.shard_fingerprint
        local = fetch_data(conn, again, IslandState(tmp_path / f"local-{k}"), "digits")
        assert local.fingerprint() == lease.shard_fingerprint


def _randomise(model, scale: str) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if scale == "unit":
                p.normal_(0, 1)
            else:  # like its initialisation; the zero-initialised layers get 0.02
                std = float(p.std()) if p.numel() > 1 else 0.0
                p.normal_(0, std if std > 0 else 0.02)


@pytest.mark.parametrize("weights", ["untrained", "unit", "init-scale"])
def test_weights_of_the_right_shape_that_learned_nothing_are_refused(server, tmp_path, weights):
    conn, _ = enroll(server)
    lease = lease_for(conn)
    model = untrained_model(DiTConfig.from_dict(json.loads(lease.model_config_json)), init_seed=lease.expert_id)
    if weights != "untrained":
        _randomise(model, weights)
    path = tmp_path / "expert.safetensors"
    save_checkpoint(path, model, cluster_id=lease.cluster_id, steps=STEPS, data_fingerprint=lease.shard_fingerprint)
    events = len(server.registry.events())
    message = complete_rejected(
        server, conn, lease, path.read_bytes(), "held-out probe slice", "is not at least 5% below an untrained model's"
    )
    assert server.registry.expert(lease.expert_id).state == "uploaded"
    added = server.registry.events()[events:]
    kinds = [e.kind for e in added]
    assert kinds[-1] == "upload_rejected" and not {"verified", "signed"} & set(kinds), kinds
    assert json.loads(added[-1].detail)["reason"] in message
    assert server.registry.lease(lease.lease_id).state == "active"  # free to upload a real expert
