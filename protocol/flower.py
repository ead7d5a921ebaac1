"""The vocabulary ddm's Flower apps share (coordinator/flower_server.py, client/flower_client.py).

A train message carries a ConfigRecord ``ddm`` with ``format`` and ``lease`` (a serialized
ddm.v1.Lease, exactly what AcquireLease gives a ddm island) and, in shared mode, an ArrayRecord
``shard`` whose Array ``file`` holds the cluster's shard file. The reply carries a ConfigRecord
``ddm`` with ``format`` and either ``sha256`` (and an ArrayRecord ``checkpoint`` whose Array
``file`` holds the checkpoint file), ``uploaded`` (the sha256 of a checkpoint the node uploaded
through ddm's gRPC port, which the coordinator signed), or ``refused`` (why the node cannot
train the lease). When the ServerApp serves ddm's port, the train message also carries a
ConfigRecord ``upload``: ``address``, ``credential`` (the node's island), ``tls-fingerprint``
(the certificate to pin; "" for plaintext on loopback) and ``public-key`` (the coordinator's
signing key, hex).
Files travel as raw bytes (Array stype ``raw``): never pickled, never parsed by numpy.
"""

MESSAGE_TYPE = "train.expert"  # the ClientApp's handler: @app.train("expert")
FORMAT = 1
RECORD = "ddm"
SHARD = "shard"
CHECKPOINT = "checkpoint"
FILE = "file"
RAW = "raw"
UPLOAD = "upload"
