"""Every wire limit in one place: message and chunk sizes, field bounds, deadlines, keepalive,
retries, rates and concurrent streams."""

from __future__ import annotations

MiB = 1024 * 1024

# Upload chunks: 1 to 4 MiB each (the last one may be shorter); downloads use the largest.
MIN_CHUNK_BYTES = 1 * MiB
MAX_CHUNK_BYTES = 4 * MiB
DEFAULT_CHUNK_BYTES = 4 * MiB

# A message carries at most one chunk plus a little framing.
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + 1 * MiB

# Field bounds (protocol/bounds.py applies them to every request the coordinator accepts).
MAX_ID_CHARS = 32  # island, lease and upload ids: 16 lowercase hex characters today
MAX_TOKEN_CHARS = 100  # invite tokens
MAX_NAME_CHARS = 200  # free-form names (an island's)
MAX_REASON_CHARS = 500  # free-form reasons (a released lease's)
MAX_PATH_CHARS = 4096  # a dataset named by the island (a name or its local path)
MAX_CHECKPOINT_BYTES = 64 * 1024 * MiB  # no uploaded checkpoint is larger (the per-config quota is far lower)
MAX_ARTIFACT_BYTES = 1024 * 1024 * MiB  # no artifact the coordinator serves is larger
MAX_STEPS = 10**9
MAX_IMAGES_PER_SECOND = 1e9

# Deadlines (seconds) for the client's calls. Streams get a floor plus time per byte, so a
# large transfer on a slow link is not cut short while a dead one is still noticed.
UNARY_DEADLINE_S = 30.0
COMPLETE_UPLOAD_DEADLINE_S = 300.0  # the coordinator hashes and verifies the whole checkpoint
STREAM_DEADLINE_FLOOR_S = 120.0
STREAM_DEADLINE_S_PER_MIB = 2.0  # tolerates links down to about 0.5 MiB/s

# Retries of calls that failed because the coordinator was unreachable, or that it asked to be
# retried later (a rate limit, every upload slot taken): it says when in this trailing metadata.
RETRY_ATTEMPTS = 8
RETRY_BACKOFF_S = 0.5
RETRY_BACKOFF_MAX_S = 10.0
RETRY_AFTER_KEY = "ddm-retry-after-ms"
RETRY_AFTER_MAX_S = 60.0  # a longer wait asked for is cut to this

_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    *_KEEPALIVE,
]

SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
    *_KEEPALIVE,
]

SERVER_WORKERS = 32
# Calls in flight (running, or queued for a worker) beyond this are refused at once with
# RESOURCE_EXHAUSTED, which the client does not retry; it sits well above the islands one coordinator
# serves, so that a burst (every island starting, or reconnecting after a restart) queues.
SERVER_MAX_CONCURRENT_RPCS = 4096
# Download and upload streams one identity may hold open at once, and upload streams in all, so
# that slow readers and writers cannot take every worker away from heartbeats.
MAX_DOWNLOADS_PER_ISLAND = 4
MAX_UPLOADS_PER_ISLAND = 2
MAX_UPLOADS = 16
# Calls per authenticated identity: a token bucket refilled at CALLS_PER_SECOND, holding at most
# CALL_BURST. An island calls a few times per heartbeat interval, far below it.
CALLS_PER_SECOND = 50.0
CALL_BURST = 200
# Failed enrollments (wrong, used or expired tokens) per peer address: against token guessing.
# Successful ones are not counted, so that many islands behind one address can enroll at once.
ENROLL_FAILURES_PER_MINUTE = 10.0
ENROLL_FAILURE_BURST = 20
# The free-form metrics an island writes into its checkpoint end up, signed, in the manifest.
MAX_METRICS_BYTES = 16 * 1024


def stream_deadline(num_bytes: int) -> float:
    return STREAM_DEADLINE_FLOOR_S + STREAM_DEADLINE_S_PER_MIB * num_bytes / MiB


def retry_after_metadata(seconds: float) -> tuple[tuple[str, str], ...]:
    """The trailing metadata with which the coordinator asks for a retry after ``seconds``."""
    return ((RETRY_AFTER_KEY, str(max(1, round(seconds * 1000)))),)


def retry_after(metadata) -> float | None:
    """Seconds the coordinator asked the caller to wait before retrying, or None."""
    for key, value in metadata or ():
        if key == RETRY_AFTER_KEY:
            try:
                return min(max(int(value), 0) / 1000, RETRY_AFTER_MAX_S)
            except ValueError:
                return None
    return None
