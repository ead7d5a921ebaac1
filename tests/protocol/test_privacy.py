"""What an island can send the coordinator, read off the protocol itself.

Siloed mode promises that no sample, per-sample statistic or data-derived summary leaves an
island: only enrollment, heartbeats (step, loss, throughput) and the finished checkpoint with
its metadata. This test lists every field of every request message, so that a field added to
the protocol fails here until someone reviews what it could carry.
"""

from protocol import ddm_pb2
from protocol.bounds import is_repeated

# Every field an island (or a downloader) sends, by request message, with what fills it.
REVIEWED = {
    "EnrollRequest": {"token": "the invite token", "name": "a name the operator chose (hostname by default)"},
    "AcquireLeaseRequest": {
        "local_dataset": "the fixed marker client.island.OWN_COPY when `join --dataset` names a local copy of the"
        " shared dataset (never the copy's name or path), else empty (a siloed island passes --data instead)"
    },
    "HeartbeatRequest": {
        "lease_id": "identifier",
        "step": "training step",
        "loss": "mean training loss of the last window; NaN from a `join --dp-epsilon` island, whose losses"
        " stay on it",
        "images_per_second": "throughput",
    },
    "ReleaseLeaseRequest": {"lease_id": "identifier", "reason": "fixed text written by the client"},
    "BeginUploadRequest": {"lease_id": "identifier", "size": "checkpoint size", "sha256": "checkpoint hash"},
    "UploadChunk": {
        "upload_id": "identifier",
        "offset": "position",
        "data": "checkpoint bytes",
        "sha256": "chunk hash",
    },
    "QueryUploadRequest": {"upload_id": "identifier"},
    "CompleteUploadRequest": {"upload_id": "identifier"},
    "GetManifestRequest": {},
    "DownloadRequest": {"sha256": "artifact address", "offset": "position"},
    "StatusRequest": {},
}


def test_every_request_field_is_reviewed():
    service = ddm_pb2.DESCRIPTOR.services_by_name["Coordinator"]
    requests = {method.input_type.name: method.input_type for method in service.methods}
    assert set(requests) == set(REVIEWED), "a request message was added or removed: review what it carries"
    for name, message in requests.items():
        assert {f.name for f in message.fields} == set(REVIEWED[name]), f"{name}'s fields changed: review them"
        for field in message.fields:
            # Flat scalars only: no nested message or repeated field could smuggle a table of values.
            assert field.message_type is None, f"{name}.{field.name} is a nested message"
            assert not is_repeated(field), f"{name}.{field.name} is repeated"
