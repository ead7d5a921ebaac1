"""The island runtime: enroll, lease, train locally, heartbeat, upload; download and sample."""
