"""The coordinator's registry: islands, invites, experts, leases, uploads, artifacts, ensembles
and an append-only event log, in SQL through SQLAlchemy 2.0.

``Registry`` is the one front door; each room of it lives in a module named after what it
holds: tables (rows and their states), core (engine, transactions, event log, reads),
identities (invites, credentials, revocation, traffic), leases, uploads, and ensembles
(artifacts, publication, withdrawal). One coordinator process serves a registry; the
command-line tools add invites, revoke islands and publish ensembles beside it (SQLite's busy
timeout queues their writes). Errors carry a ``code`` that the gRPC service maps to a status
code; nothing here knows of gRPC.
"""

from .core import RegistryError, Revoked, revoked_message, shown
from .ensembles import STALE_ASSEMBLY_S, named_by
from .identities import Identities, Revocation
from .leases import Grant, NoWork
from .tables import (
    INVITE_ROLES,
    ROLES,
    TRAFFIC_COLUMNS,
    UNSIGNED,
    Artifact,
    Ensemble,
    Event,
    Expert,
    Invite,
    Island,
    Lease,
    Point,
    Upload,
)
from .uploads import Uploads


class Registry(Identities, Uploads):
    """Every operation of the registry, one transaction each (see the modules for each room)."""


__all__ = [
    "INVITE_ROLES",
    "ROLES",
    "STALE_ASSEMBLY_S",
    "TRAFFIC_COLUMNS",
    "UNSIGNED",
    "Artifact",
    "Ensemble",
    "Event",
    "Expert",
    "Grant",
    "Invite",
    "Island",
    "Lease",
    "NoWork",
    "Point",
    "Registry",
    "RegistryError",
    "Revocation",
    "Revoked",
    "Upload",
    "named_by",
    "revoked_message",
    "shown",
]
