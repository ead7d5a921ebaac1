"""Every wire limit in one place: message and chunk sizes, deadlines, keepalive, retries."""

from __future__ import annotations

MiB = 1024 * 1024

# Upload chunks: 1 to 4 MiB each (the last one may be shorter); downloads use the largest.
MIN_CHUNK_BYTES = 1 * MiB
MAX_CHUNK_BYTES = 4 * MiB
DEFAULT_CHUNK_BYTES = 4 * MiB

# A message carries at most one chunk plus a little framing.
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + 1 * MiB

# Deadlines (seconds) for the client's calls. Streams get a floor plus time per byte, so a
# large transfer on a slow link is not cut short while a dead one is still noticed.
UNARY_DEADLINE_S = 30.0
COMPLETE_UPLOAD_DEADLINE_S = 300.0  # the coordinator hashes and verifies the whole checkpoint
STREAM_DEADLINE_FLOOR_S = 120.0
STREAM_DEADLINE_S_PER_MIB = 2.0  # tolerates links down to about 0.5 MiB/s

# Retries of calls that failed because the coordinator was unreachable.
RETRY_ATTEMPTS = 8
RETRY_BACKOFF_S = 0.5
RETRY_BACKOFF_MAX_S = 10.0

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
# Download streams one identity may hold open at once, so that slow readers cannot take every
# worker away from heartbeats.
MAX_DOWNLOADS_PER_ISLAND = 4
# The free-form metrics an island writes into its checkpoint end up, signed, in the manifest.
MAX_METRICS_BYTES = 16 * 1024


def stream_deadline(num_bytes: int) -> float:
    return STREAM_DEADLINE_FLOOR_S + STREAM_DEADLINE_S_PER_MIB * num_bytes / MiB
