"""What `ddm-coordinator status` and `events` show: islands, experts, leases, router and
ensemble, key, and the event log.

``build_status`` and ``build_events`` give plain JSON (the Status RPC serves the former,
without events); ``render_status`` and ``render_events`` draw them as rich tables.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from sqlalchemy import select

from .home import CoordinatorConfig, Home
from .registry import Event, Registry
from .tls import home_fingerprint

# Events of reconciliation that a person should see: lost artifacts and what followed.
FLAG_KINDS = ("artifact_missing", "artifact_damaged", "expert_reopened", "ensemble_withdrawn")
CURVE_POINTS = 100  # the most points of an expert's training curve that status gives
TRAINING = ("leased", "training")  # an expert's states while its island trains it


def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


def build_status(
    home: Home, config: CoordinatorConfig, registry: Registry, key_fingerprint: str, events: int = 0
) -> dict:
    """The coordinator's state as plain JSON; with ``events``, the last that many events too."""
    snap = registry.snapshot()
    now = registry.clock.now()
    steps = config.train["steps"]
    rates: dict[str, float] = {}  # island id -> images per second over the experts it trains now
    for e in snap["experts"]:
        if e["state"] in TRAINING and e["island_id"] and e["images_per_second"]:
            rates[e["island_id"]] = rates.get(e["island_id"], 0.0) + e["images_per_second"]
    islands = [
        {
            "id": i["id"],
            "name": i["name"],
            "role": i["role"],
            # Alive: not revoked, and heard from within a lease's length (a live island beats more often).
            "alive": i["revoked_at"] is None and now - i["last_seen_at"] <= config.lease_seconds,
            "images_per_second": rates.get(i["id"]),
            "enrolled": _iso(i["created_at"]),
            "last_seen": _iso(i["last_seen_at"]),
            "seconds_since_seen": round(now - i["last_seen_at"], 1),
            "revoked": _iso(i["revoked_at"]),
            "revoked_reason": i["revoked_reason"] or None,
            "bytes_received": i["bytes_received"],
            "sent": {
                "checkpoint": {"messages": i["checkpoint_messages"], "bytes": i["checkpoint_message_bytes"]},
                "heartbeats": {"messages": i["heartbeats"], "bytes": i["heartbeat_bytes"]},
                "control": {"messages": i["control_messages"], "bytes": i["control_bytes"]},
            },
        }
        for i in snap["islands"]
    ]
    latest_lease = {}  # expert id -> its latest lease's id, whose curve status shows
    for lease in sorted(snap["leases"], key=lambda lease: lease["issued_at"]):
        latest_lease[lease["expert_id"]] = lease["id"]
    curves = registry.curves(list(latest_lease.values()))
    experts = [
        {
            "id": e["id"],
            "cluster_id": e["cluster_id"],
            "state": e["state"],
            "island_id": e["island_id"],
            "step": e["step"],
            "steps": steps,
            "loss": e["loss"],
            "images_per_second": e["images_per_second"],
            "checkpoint_sha256": e["checkpoint_sha256"],
            # A signed expert's differential-privacy guarantee, as its signed entry states it.
            "privacy": json.loads(e["entry_json"]).get("privacy") if e["entry_json"] else None,
            # (step, loss) from the heartbeats of its latest lease, at most CURVE_POINTS of them.
            "curve": _thinned(curves.get(latest_lease.get(e["id"]), [])),
        }
        for e in sorted(snap["experts"], key=lambda e: e["id"])
    ]
    leases = [
        {
            "id": lease["id"],
            "expert_id": lease["expert_id"],
            "island_id": lease["island_id"],
            "state": lease["state"],
            "issued": _iso(lease["issued_at"]),
            "deadline": _iso(lease["deadline_at"]),
            "seconds_left": round(lease["deadline_at"] - now, 1) if lease["state"] == "active" else None,
        }
        for lease in sorted(snap["leases"], key=lambda lease: lease["issued_at"])
    ]
    ensembles = sorted(snap["ensembles"], key=lambda e: e["id"])
    latest = ensembles[-1] if ensembles else None
    published = []  # every manifest version signed, newest first
    for e in reversed(ensembles):
        if e["manifest_json"]:
            sha = hashlib.sha256(e["manifest_json"]).hexdigest()
            grid = home.samples / f"{sha}.png"  # the dashboard's samples of it (coordinator/dashboard/samples.py)
            published.append(
                {
                    "id": e["id"],
                    "state": e["state"],
                    "experts": e["experts"],
                    "updated": _iso(e["updated_at"]),
                    "manifest_sha256": sha,
                    "sample_grid": grid.name if grid.is_file() else None,
                }
            )
    # Steps chosen by a FLOPs share are known once assembly starts (null until then).
    fixed = config.router_share <= 0
    router = {"state": "waiting for experts", "step": 0, "steps": config.router_train["steps"] if fixed else None}
    ensemble = {"state": "none"}
    if latest is not None:
        router = {
            "state": {"training": "training", "published": "trained"}.get(latest["state"], latest["state"]),
            "step": latest["router_step"],
            "steps": latest["router_steps"],
            "sha256": latest["router_sha256"],
        }
        ensemble = {
            "state": latest["state"],
            "id": latest["id"],
            "experts": latest["experts"],
            "updated": _iso(latest["updated_at"]),
            "reason": latest["reason"] or None,
        }
        if latest["manifest_json"]:
            ensemble["manifest_sha256"] = hashlib.sha256(latest["manifest_json"]).hexdigest()
    report = {
        "coordinator": {
            "home": str(home.root),
            "key_fingerprint": key_fingerprint,
            "tls_fingerprint": home_fingerprint(home),
            "mode": config.mode,
            "dataset": config.dataset,
            "dataset_fingerprint": config.dataset_fingerprint,
            "experts": config.experts,
            "model_preset": config.model["preset"],
            "steps_per_expert": steps,
            "classes": config.model.get("num_classes", 0),
            # Latent homes: the autoencoder the experts' space belongs to, and that space.
            "latent": (
                {
                    "autoencoder_identity": config.autoencoder["identity"],
                    "autoencoder_sha256": config.autoencoder["sha256"],
                    "shape": [config.model["in_channels"], config.model["image_size"], config.model["image_size"]],
                }
                if config.autoencoder
                else None
            ),
            "require_dp_epsilon": config.require_dp_epsilon,
            "router_budget": (
                f"{config.router_train['steps']} steps, fixed"
                if fixed
                else f"{config.router_share:g} of the experts' training FLOPs"
            ),
        },
        "islands": islands,
        "experts": experts,
        "leases": leases,
        "router": router,
        "ensemble": ensemble,
        "ensembles": published,
        "store": _store(home, registry, snap),
    }
    if events:
        report["events"] = build_events(registry, limit=events)
    return report


def _thinned(points: list[tuple[int, float]]) -> list[list]:
    """At most CURVE_POINTS of ``points``, evenly spread, the first and last among them."""
    if len(points) > CURVE_POINTS:
        last = len(points) - 1
        points = [points[round(k * last / (CURVE_POINTS - 1))] for k in range(CURVE_POINTS)]
    return [[step, round(loss, 6)] for step, loss in points]


def build_events(
    registry: Registry, limit: int | None = None, island_id: str | None = None, kind: str | None = None
) -> list[dict]:
    """The last ``limit`` events (all if None) matching the filters, oldest first."""
    return [
        {
            "id": e.id,
            "at": _iso(e.at),
            "kind": e.kind,
            "island_id": e.island_id,
            "expert_id": e.expert_id,
            "detail": json.loads(e.detail),
        }
        for e in registry.events(limit=limit, island_id=island_id, kind=kind)
    ]


def render_events(events: list[dict], console: Console, title: str = "events") -> None:
    console.print(_events_table(events, title))


def _events_table(events: list[dict], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("time (UTC)", "kind", "island", "expert", "detail"):
        table.add_column(col)
    for e in events:
        detail = " ".join(f"{k}={_short(v)}" for k, v in e["detail"].items())
        table.add_row(  # as plain text: names and reasons are not rich markup
            e["at"].replace("+00:00", ""),
            Text(e["kind"]),
            Text(e["island_id"] or ""),
            "" if e["expert_id"] is None else str(e["expert_id"]),
            Text(detail),
        )
    return table


def _short(value) -> str:
    """sha256 digests cut to 12 characters, the rest as they are."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:12] if re.fullmatch(r"[0-9a-f]{64}", text) else text


def _store(home: Home, registry: Registry, snap: dict) -> dict:
    """Registered artifacts whose file is missing or of the wrong size now, and the flags
    reconciliation raised (latest first)."""
    missing = []
    for a in snap["artifacts"]:
        try:
            size = (home.artifacts / a["sha256"]).stat().st_size
        except OSError:
            size = None
        if size != a["size"]:
            reason = "missing" if size is None else f"{size} bytes, {a['size']} registered"
            missing.append({"sha256": a["sha256"], "kind": a["kind"], "reason": reason})
    with registry.Session() as s:
        events = s.scalars(select(Event).where(Event.kind.in_(FLAG_KINDS)).order_by(Event.id.desc()).limit(20)).all()
    flagged = [{"at": _iso(e.at), "kind": e.kind, "expert_id": e.expert_id, **json.loads(e.detail)} for e in events]
    return {"artifacts": len(snap["artifacts"]), "missing": missing, "flagged": flagged}


def render_status(status: dict, console: Console) -> None:
    console.print(status_view(status))


def status_view(status: dict) -> Group:
    """``status`` (``build_status``'s JSON) as rich tables: what `status` prints and `status
    --watch` redraws. Every string that came from outside (names, reasons, paths) is shown as
    plain text, never read as markup."""
    c = status["coordinator"]
    data = (
        "siloed: each island trains on its own data, which never leaves it"
        if c["mode"] == "siloed"
        else f"dataset {escape(c['dataset'])} ({c['dataset_fingerprint'][:16]}…)"
    )
    tls = c.get("tls_fingerprint") or "none (create one with `ddm-coordinator tls`)"
    head = (
        f"[bold]coordinator[/bold] {escape(c['home'])}  key {c['key_fingerprint']}\n"
        f"TLS certificate {tls}\n"
        f"{data}; {c['experts']} experts of preset {c['model_preset']}, {c['steps_per_expert']} steps each"
    )
    latent = c.get("latent")
    if latent:
        shape = "x".join(map(str, latent["shape"]))
        head += f"\nlatent space: {shape} latents of autoencoder {latent['autoencoder_identity'][:16]}…"
    if c.get("require_dp_epsilon") is not None:
        head += f"\nsigns only differentially private experts: epsilon <= {c['require_dp_epsilon']:g}"
    islands = Table(title="islands (what each sent, as serialized messages)", title_justify="left")
    for col in ("island", "name", "role", "access", "last seen", "img/s", "checkpoint", "heartbeats", "control"):
        islands.add_column(col)
    for i in status["islands"]:
        sent = i["sent"]
        access = "active" if i["alive"] else "[yellow]active, silent[/yellow]"
        islands.add_row(
            i["id"],
            Text(i["name"]),
            i["role"],
            "[red]revoked[/red]" if i["revoked"] else access,
            f"{i['seconds_since_seen']:.0f} s ago",
            "" if i["images_per_second"] is None else f"{i['images_per_second']:,.0f}",
            _bytes(sent["checkpoint"]["bytes"]),
            f"{sent['heartbeats']['messages']} ({_bytes(sent['heartbeats']['bytes'])})",
            f"{sent['control']['messages']} ({_bytes(sent['control']['bytes'])})",
        )
    experts = Table(title="experts", title_justify="left")
    for col in ("expert", "cluster", "state", "island", "step", "loss", "img/s", "checkpoint", "privacy"):
        experts.add_column(col)
    for e in status["experts"]:
        experts.add_row(
            str(e["id"]),
            str(e["cluster_id"]),
            e["state"],
            e["island_id"] or "",
            f"{e['step']}/{e['steps']}",
            "" if e["loss"] is None else f"{e['loss']:.4f}",
            "" if e["images_per_second"] is None else f"{e['images_per_second']:,.0f}",
            (e["checkpoint_sha256"] or "")[:12],
            _privacy(e.get("privacy")),
        )
    leases = Table(title="leases", title_justify="left")
    for col in ("lease", "expert", "island", "state", "deadline"):
        leases.add_column(col)
    for lease in status["leases"]:
        left = lease["seconds_left"]
        deadline = f"in {left:.0f} s" if left is not None else lease["deadline"]
        leases.add_row(lease["id"], str(lease["expert_id"]), lease["island_id"], lease["state"], deadline)
    r, e = status["router"], status["ensemble"]
    if r["steps"] is None:
        progress = f"steps: {status['coordinator']['router_budget']}, chosen at assembly"
    else:
        progress = f"{r['step']}/{r['steps']} steps"
    tail = f"router: {r['state']} ({progress})   ensemble: {e['state']}"
    if e.get("manifest_sha256"):
        tail += f" (manifest {e['manifest_sha256'][:12]}, {e['experts']} experts)"
    if e.get("reason"):
        tail += f": {e['reason']}"
    store = status.get("store", {"artifacts": 0, "missing": [], "flagged": []})
    lines = [f"store: {store['artifacts']} artifacts, {len(store['missing'])} missing or damaged"]
    lines += [f"[red]missing:[/red] {m['kind']} {m['sha256']} ({escape(m['reason'])})" for m in store["missing"]]
    lines += [
        f"[yellow]flagged[/yellow] {f['at']} {f['kind']}: {f.get('sha256', '')[:12]} {escape(f.get('reason', ''))}"
        for f in store["flagged"]
    ]
    parts = [head, islands, experts, leases, Text(tail), *lines]
    if status.get("events"):
        parts.append(_events_table(status["events"], f"last {len(status['events'])} events"))
    return Group(*parts)


def _privacy(guarantee: dict | None) -> str:
    if not guarantee:
        return ""
    return f"ε {guarantee['epsilon']:.3g}, δ {guarantee['delta']:.2g}"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
