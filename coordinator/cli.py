"""``ddm-coordinator``: the coordinator's command line."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.console import Console

from ddm_model import __version__
from ddm_model.errors import DDMError
from ddm_model.progress import console as err_console

# gRPC's C core prints handshake and connection chatter at INFO; errors reach the user as one line.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

app = typer.Typer(
    help="Coordinate a Decentralized Diffusion Model: cluster the data, lease experts to islands, "
    "validate and sign their checkpoints, train the router and publish the ensemble.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console()

HOME_HELP = "Coordinator home folder (default: $DDM_HOME)."


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _home(home: Path | None):
    from .home import Home, resolve_home

    return Home(resolve_home(home))


@app.command()
def init(
    home: Path = typer.Option(None, help=HOME_HELP),
    dataset: str = typer.Option("digits", help="'digits', an .npz file or an image folder."),
    experts: int = typer.Option(4, min=2, help="K: clusters, and so experts."),
    preset: str = typer.Option("small", help="Expert model preset (tiny, small, S/2, B/2, XL/2, ...)."),
    steps: int = typer.Option(1200, min=1, help="Training steps per expert."),
    batch_size: int = typer.Option(64, min=1, help="Batch size for experts and router."),
    lr: float = typer.Option(3e-3, help="Expert learning rate."),
    router_preset: str = typer.Option("small", help="Router model preset."),
    router_steps: int = typer.Option(2000, min=1, help="Router training steps."),
    clustering: str = typer.Option("kmeans2", help="kmeans2 (two-stage k-means) or random."),
    features: str = typer.Option("pixels", help="Clustering features: pixels or dinov2."),
    dinov2_weights: str = typer.Option(None, help="Local folder with DINOv2 config.json + model.safetensors."),
    mode: str = typer.Option("shared", help="shared (the coordinator holds the data) or siloed (only islands do)."),
    image_size: int = typer.Option(None, help="Resize images to this square size (siloed: the islands' image size)."),
    channels: int = typer.Option(None, help="Siloed mode: image channels (1 grey, 3 RGB)."),
    router_samples: int = typer.Option(1024, help="Siloed mode: samples drawn from each expert to train the router."),
    seed: int = typer.Option(0, help="Seed for clustering and training."),
    lease_seconds: float = typer.Option(120.0, help="A lease expires this long after its last heartbeat."),
    heartbeat_seconds: float = typer.Option(10.0, help="How often islands report progress."),
    max_upload_mb: float = typer.Option(0.0, help="Upload quota per checkpoint (0: expected size + 1 MiB)."),
    database: str = typer.Option("", help="SQLAlchemy URL of the registry (default: SQLite in the home)."),
    probe_margin: float = typer.Option(
        0.05,
        help="Shared mode: an upload is refused unless its loss on its cluster's held-out probe slice is"
        " this fraction below an untrained model's.",
    ),
) -> None:
    """Cluster the dataset, hold out a probe slice of each cluster, cut one shard per cluster from
    the rest, create the registry and the signing key."""
    from .bootstrap import InitOptions, init_home

    try:
        root = _home(home).root
        made, fingerprint = init_home(
            InitOptions(
                home=root,
                dataset=dataset,
                experts=experts,
                preset=preset,
                steps=steps,
                batch_size=batch_size,
                lr=lr,
                router_preset=router_preset,
                router_steps=router_steps,
                clustering=clustering,
                features=features,
                feature_weights=dinov2_weights,
                seed=seed,
                image_size=image_size,
                channels=channels,
                mode=mode,
                router_samples=router_samples,
                lease_seconds=lease_seconds,
                heartbeat_seconds=heartbeat_seconds,
                max_upload_mb=max_upload_mb,
                database_url=database,
                probe_margin=probe_margin,
            )
        )
    except (DDMError, OSError) as exc:
        fail(str(exc))
    config = made.load_config()
    if config.mode == "siloed":
        model = config.model
        out.print(
            f"initialised {made.root} in siloed mode: {experts} experts on the islands' own "
            f"{model['in_channels']}x{model['image_size']}x{model['image_size']} images; the coordinator holds no data"
        )
    else:
        out.print(
            f"initialised {made.root}: {experts} experts on {dataset}, cluster sizes {config.clustering['sizes']}"
        )
    out.print("signing key fingerprint:")
    print(fingerprint)


@app.command()
def serve(
    home: Path = typer.Option(None, help=HOME_HELP),
    listen: str = typer.Option("127.0.0.1:50051", help="HOST:PORT to listen on (0.0.0.0:PORT for every interface)."),
    tls_cert: Path = typer.Option(None, help="Serve TLS with this certificate chain (PEM); needs --tls-key."),
    tls_key: Path = typer.Option(None, help="The TLS private key (PEM)."),
) -> None:
    """Run the coordinator until interrupted."""
    from .server import CoordinatorServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    tls = None
    if (tls_cert is None) != (tls_key is None):
        fail("--tls-cert and --tls-key go together")
    if tls_cert is not None:
        try:
            tls = (tls_cert.read_bytes(), tls_key.read_bytes())
        except OSError as exc:
            fail(f"cannot read {exc.filename}: {exc.strerror}")
        try:
            x509.load_pem_x509_certificates(tls[0])
            serialization.load_pem_private_key(tls[1], password=None)
        except ValueError as exc:
            fail(f"--tls-cert must be a PEM certificate chain and --tls-key an unencrypted PEM private key ({exc})")
    try:
        server = CoordinatorServer(_home(home), listen, tls)
    except (DDMError, OSError) as exc:
        fail(str(exc))
    server.start()
    host = listen.rsplit(":", 1)[0]
    mode = "TLS" if tls else "plaintext"
    err_console.print(
        f"coordinator listening on {host}:{server.port} ({mode}), key {server.key.fingerprint}",
        highlight=False,
        soft_wrap=True,
    )

    def shutdown(signum, frame):
        server.stop()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    server.wait()


@app.command()
def invite(
    home: Path = typer.Option(None, help=HOME_HELP),
    role: str = typer.Option("island", help="island (trains experts) or reader (downloads only)."),
    ttl_hours: float = typer.Option(24.0, help="Hours until the token expires."),
) -> None:
    """Print a single-use, expiring invite token (the last line of output)."""
    from .registry import Registry

    if ttl_hours <= 0:
        fail("--ttl-hours must be positive")
    try:
        h = _home(home)
        config = h.load_config()
        registry = Registry(h.database_url(config))
        token = registry.create_invite(role, ttl_hours * 3600)
        registry.close()
    except (DDMError, OSError) as exc:
        fail(str(exc))
    out.print(f"single-use {role} invite, valid for {ttl_hours:g} h:")
    print(token)


@app.command()
def status(
    home: Path = typer.Option(None, help=HOME_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Show islands, experts, leases, router and ensemble state, and the key fingerprint."""
    from .keys import SigningKey
    from .registry import Registry
    from .status import build_status, render_status

    try:
        h = _home(home)
        config = h.load_config()
        registry = Registry(h.database_url(config))
        fingerprint = SigningKey.load(h.key_path).fingerprint
        report = build_status(h, config, registry, fingerprint)
        registry.close()
    except (DDMError, OSError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render_status(report, out)


@app.command()
def assemble(home: Path = typer.Option(None, help=HOME_HELP)) -> None:
    """Train the router over the experts signed so far (at least 2) and publish the ensemble."""
    from .assemble import Assembler
    from .keys import SigningKey
    from .registry import Registry
    from .store import Store

    try:
        h = _home(home)
        config = h.load_config()
        registry = Registry(h.database_url(config), lease_seconds=config.lease_seconds)
        assembler = Assembler(h, config, registry, Store(h.artifacts, h.staging), SigningKey.load(h.key_path))
        ensemble_id = assembler.run(progress=True)
        registry.close()
    except (DDMError, OSError) as exc:
        fail(str(exc))
    out.print(f"published ensemble {ensemble_id}")


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("ddm-demo"), "--out", help="Folder for the coordinator, islands and results."),
    experts: int = typer.Option(4, min=2, help="Number of islands, clusters and experts."),
    preset: str = typer.Option("small", help="Expert model preset."),
    steps: int = typer.Option(1200, min=1, help="Training steps per expert."),
    router_steps: int = typer.Option(2000, min=1, help="Router training steps."),
    routing: str = typer.Option("top2", help="Routing when sampling: full, top1, top2, ..."),
    samples: int = typer.Option(1000, min=2, help="Samples for the Fréchet distance (the grid shows 100)."),
    sampling_steps: int = typer.Option(20, min=1, help="ODE steps per sample."),
    seed: int = typer.Option(0, help="Seed for clustering, training and sampling."),
) -> None:
    """Run the whole system on this machine: a coordinator on loopback, one island process per
    expert on the built-in digits, then assemble, download, verify and sample."""
    from .demo import DemoSettings, run_demo

    try:
        run_demo(DemoSettings(out_dir, experts, preset, steps, router_steps, routing, samples, sampling_steps, seed))
    except (DDMError, OSError) as exc:
        fail(str(exc))


@app.command()
def version() -> None:
    """Print the ddm version."""
    out.print(f"ddm {__version__}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
