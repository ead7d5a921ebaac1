"""The operator's ``ddm-coordinator`` commands over a home's registry: invite, status, events,
revoke, check, assemble and migrate. Each opens the registry once (``opened``), which closes it however
the command ends; ``coordinator/cli.py`` registers them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from ddm_model.errors import DDMError

from .cli_common import HOME_HELP, fail, opened, out


def invite(
    home: Path = typer.Option(None, help=HOME_HELP),
    role: str = typer.Option(
        "island",
        help="island (trains experts), reader (downloads only) or operator (logs into `serve --dashboard`).",
    ),
    ttl_hours: float = typer.Option(24.0, help="Hours until the token expires."),
    address: str = typer.Option("HOST:50051", help="HOST:PORT islands reach this coordinator at, for the hint."),
) -> None:
    """Print an expiring invite token (the last line of output), after a command that uses it. An
    island's or reader's token enrolls once; an operator's logs into the dashboard until it expires."""
    from .keys import SigningKey
    from .tls import home_fingerprint

    if ttl_hours <= 0:
        fail("--ttl-hours must be positive")
    with opened(home) as (h, _, registry):
        key = SigningKey.load(h.key_path).fingerprint
        token = registry.create_invite(role, ttl_hours * 3600)
    tls_fp = home_fingerprint(h)
    tls = f"--tls-fingerprint {tls_fp}" if tls_fp else "--tls-ca CA.pem"
    if not tls_fp:
        out.print(f"note: {h.root} has no TLS certificate yet; create one with `ddm-coordinator tls`", highlight=False)
    if role == "operator":
        out.print(
            "log into the dashboard (`ddm-coordinator serve --dashboard HOST:PORT`) with this token; it logs in"
            f" until it expires, in {ttl_hours:g} h, and enrolls nothing:",
            highlight=False,
        )
        print(token)
        return
    if role == "reader":
        hint = f"ddm-client download --coordinator {address} {tls} --fingerprint {key} --out ensemble/ --token {token}"
    else:
        hint = f"ddm-client join --coordinator {address} {tls} --fingerprint {key} --token {token}"
    out.print(f"on the {role}'s machine:", highlight=False)
    print(f"  {hint}")
    out.print(f"single-use {role} invite, valid for {ttl_hours:g} h:")
    print(token)


def status(
    home: Path = typer.Option(None, help=HOME_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    events: int = typer.Option(
        None, min=0, help="Show the last N events of the log (default: 10 in the tables, none in --json)."
    ),
    watch: bool = typer.Option(False, "--watch", help="Redraw the tables every --interval seconds until Ctrl-C."),
    interval: float = typer.Option(2.0, min=0.1, help="Seconds between redraws with --watch."),
) -> None:
    """Show islands, experts, leases, router and ensemble state, the key fingerprint and the
    latest events (`ddm-coordinator events` shows more)."""
    from .keys import SigningKey
    from .status import build_status, render_status

    if watch and as_json:
        fail("--watch redraws the tables; it does not go with --json")
    if events is None:
        events = 0 if as_json else 10
    with opened(home) as (h, config, registry):
        fingerprint = SigningKey.load(h.key_path).fingerprint
        if watch:
            _watch(lambda: build_status(h, config, registry, fingerprint, events=events), interval)
            return
        report = build_status(h, config, registry, fingerprint, events=events)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render_status(report, out)


def _watch(build, interval: float) -> None:
    """`status --watch`: the tables redrawn in place from the registry every ``interval``
    seconds (a full-screen view, as `top` draws), until Ctrl-C."""
    import time

    from rich.live import Live

    from .status import status_view

    with Live(status_view(build()), console=out, screen=out.is_terminal, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(status_view(build()), refresh=True)
        except KeyboardInterrupt:
            pass


def events(
    home: Path = typer.Option(None, help=HOME_HELP),
    island: str = typer.Option(None, help="Only the events of this island."),
    kind: str = typer.Option(None, help="Only events of this kind (enroll, lease, signed, revoked, ...)."),
    limit: int = typer.Option(50, min=0, help="The last N matching events (0: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show the append-only event log: every state change, oldest first."""
    from .status import build_events, render_events

    with opened(home) as (_, _, registry):
        rows = build_events(registry, limit=limit or None, island_id=island, kind=kind)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        render_events(rows, out, title=f"{len(rows)} events")


def revoke(
    island: str = typer.Argument(..., help="The island's id (as `ddm-coordinator status` lists it)."),
    home: Path = typer.Option(None, help=HOME_HELP),
    reason: str = typer.Option("", help="Why; the island is told, and the event log keeps it."),
    exclude: bool = typer.Option(
        False, "--exclude", help="Also drop its signed experts and republish the ensemble without them."
    ),
) -> None:
    """End an island's access at once (also while `serve` runs): its leases end, its unfinished
    uploads are discarded; with --exclude its experts open again for other islands and the
    ensemble is republished without them."""
    from .store import Store

    with opened(home) as (h, config, registry):
        store = Store(h.artifacts, h.staging)
        done = registry.revoke(island, reason, exclude=exclude)
        for upload_id in done.uploads:
            store.discard_staged(upload_id)
        out.print(f"revoked island {done.island_id} ({done.reason}); its next call is refused", highlight=False)
        leases = ", ".join(f"{lease} (expert {expert})" for lease, expert in done.leases)
        out.print(f"leases ended: {leases or 'none'}; their experts are open again", highlight=False)
        out.print(f"uploads discarded: {', '.join(done.uploads) or 'none'}", highlight=False)
        if exclude:
            out.print(f"experts reopened: {', '.join(map(str, done.experts)) or 'none'}", highlight=False)
            out.print(f"ensembles withdrawn: {', '.join(map(str, done.withdrawn)) or 'none'}", highlight=False)
            if done.stopped:
                out.print(f"assemblies stopped: {', '.join(map(str, done.stopped))}", highlight=False)
            if done.withdrawn or done.stopped:
                _republish(h, config, registry, store)


def _republish(h, config, registry, store) -> None:
    """After an exclusion: publish the ensemble again over the experts still signed."""
    signed = sum(e.state == "signed" for e in registry.experts())
    if signed < 2:
        out.print(
            f"not republished: {signed} signed expert(s) remain and an ensemble needs 2; the excluded experts"
            " are open for other islands to retrain",
            highlight=False,
        )
        return
    from .assemble import Assembler  # torch: imported only when a router is to be trained
    from .keys import SigningKey

    try:
        assembler = Assembler(h, config, registry, store, SigningKey.load(h.key_path))
        ensemble_id = assembler.run(progress=True)
    except (DDMError, OSError) as exc:
        fail(f"the revocation stands, but republishing failed: {exc}; retry with `ddm-coordinator assemble`")
    out.print(f"published ensemble {ensemble_id} over the {signed} remaining signed experts", highlight=False)


def check(
    home: Path = typer.Option(None, help=HOME_HELP),
    rehash: bool = typer.Option(False, "--hash", help="Also re-hash every artifact (reads the whole store)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be changed; change nothing."),
) -> None:
    """Check the registry's integrity and reconcile it with the artifact store, as `serve` does on
    start: remove what crashes leave behind, flag lost artifacts. Exits 1 if any is lost."""
    from .home import HomeBusy, HomeLock
    from .reconcile import reconcile
    from .store import Store

    logging.getLogger("ddm.coordinator").addHandler(logging.NullHandler())  # the summary below says it all
    lock = None
    try:
        with opened(home) as (h, _, registry):
            try:
                lock = None if dry_run else HomeLock(h)
            except HomeBusy as busy:
                out.print(f"{busy}: reporting only, nothing is changed", highlight=False)
            result = reconcile(h, registry, Store(h.artifacts, h.staging), rehash=rehash, repair=lock is not None)
    finally:
        if lock is not None:
            lock.release()
    for line in result.actions:
        out.print(f"  {line}", highlight=False)
    for line in result.notes:
        out.print(f"  note: {line}", highlight=False)
    for line in result.problems:
        out.print(f"  [red]problem:[/red] {line}", highlight=False)
    out.print(result.summary(), highlight=False)
    raise typer.Exit(1 if result.problems else 0)


def assemble(home: Path = typer.Option(None, help=HOME_HELP)) -> None:
    """Train the router over the experts signed so far (at least 2) and publish the ensemble."""
    from .assemble import Assembler
    from .keys import SigningKey
    from .store import Store

    with opened(home) as (h, config, registry):
        assembler = Assembler(h, config, registry, Store(h.artifacts, h.staging), SigningKey.load(h.key_path))
        ensemble_id = assembler.run(progress=True)
    out.print(f"published ensemble {ensemble_id}")


def migrate(home: Path = typer.Option(None, help=HOME_HELP)) -> None:
    """Upgrade the home's registry in place to this ddm's schema (back the database up first;
    stop `serve` while it runs). Nothing is lost: every row is kept."""
    with opened(home) as (_, _, registry):
        before, after = registry.migrate()
    if before == after:
        out.print(f"the registry is at revision {after} already; nothing to do", highlight=False)
    else:
        out.print(f"migrated the registry from revision {before} to {after}", highlight=False)
