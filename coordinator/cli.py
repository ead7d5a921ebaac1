"""``ddm-coordinator``: the coordinator's command line."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import typer

from ddm_model import __version__
from ddm_model.errors import DDMError
from ddm_model.progress import console as err_console

from . import cli_registry
from .cli_common import HOME_HELP, app, fail, out
from .cli_common import home_of as _home


@app.command()
def init(
    home: Path = typer.Option(None, help=HOME_HELP),
    dataset: str = typer.Option(
        "digits",
        help="'digits', 'fashion-mnist' or 'fashion-mnist-test' (':FOLDER' for another copy of its idx files),"
        " an .npz file or an image folder.",
    ),
    experts: int = typer.Option(4, min=2, help="K: clusters, and so experts."),
    preset: str = typer.Option("small", help="Expert model preset (tiny, small, S/2, B/2, XL/2, ...)."),
    steps: int = typer.Option(1200, min=1, help="Training steps per expert."),
    batch_size: int = typer.Option(64, min=1, help="Batch size for experts and router."),
    lr: float = typer.Option(3e-3, help="Expert learning rate."),
    router_preset: str = typer.Option(None, help="Router model preset (default: the experts' --preset)."),
    router_steps: int = typer.Option(
        None, min=1, help="Router training steps, fixed (default: as many as --router-share buys)."
    ),
    router_share: float = typer.Option(
        None,
        help="Unless --router-steps: the router's training FLOPs as a share of the signed experts' total,"
        " turned into steps when the ensemble is assembled (default: 0.04, as in the paper).",
    ),
    class_conditional: bool = typer.Option(
        False,
        "--class-conditional",
        help="Condition experts and router on the class label (labelled data: digits, Fashion-MNIST, .npz with"
        " 'labels', image folders with one subfolder per class); `ddm-client sample --class N` then works.",
    ),
    classes: int = typer.Option(
        None, min=1, help="Siloed mode with --class-conditional: the number of classes (islands' labels 0..N-1)."
    ),
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
    tls_name: list[str] = typer.Option(
        None, help="A DNS name or IP address islands reach this machine by, for the TLS certificate (repeatable)."
    ),
    probe_margin: float = typer.Option(
        0.05,
        help="Shared mode: an upload is refused unless its loss on its cluster's held-out probe slice is"
        " this fraction below an untrained model's.",
    ),
    latent: Path = typer.Option(
        None,
        help="Train the experts in the latent space of the diffusers AutoencoderKL in this local folder"
        " (config.json + diffusion_pytorch_model.safetensors; nothing is downloaded). Needs ddm[latent].",
    ),
    require_dp_epsilon: float = typer.Option(
        None,
        help="Siloed mode: sign only experts trained with differential privacy (join --dp-epsilon) at this"
        " epsilon or less, with a delta below 1/N of their silo's N samples.",
    ),
) -> None:
    """Cluster the dataset, hold out a probe slice of each cluster, cut one shard per cluster from
    the rest, create the registry, the signing key and the TLS certificate."""
    from .bootstrap import InitOptions, init_home
    from .tls import home_fingerprint

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
                router_share=router_share,
                class_conditional=class_conditional,
                classes=classes,
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
                tls_names=tuple(tls_name or ()),
                probe_margin=probe_margin,
                latent=None if latent is None else str(latent),
                require_dp_epsilon=require_dp_epsilon,
            )
        )
    except (DDMError, OSError) as exc:
        fail(str(exc))
    config = made.load_config()
    if config.mode == "siloed":
        model = config.model
        images = config.autoencoder.get("image") or [model["in_channels"], model["image_size"], model["image_size"]]
        out.print(
            f"initialised {made.root} in siloed mode: {experts} experts on the islands' own "
            f"{'x'.join(map(str, images))} images; the coordinator holds no data"
        )
    else:
        out.print(
            f"initialised {made.root}: {experts} experts on {dataset}, cluster sizes {config.clustering['sizes']}"
        )
    if config.autoencoder:
        model = config.model
        out.print(
            f"  experts train on {model['in_channels']}x{model['image_size']}x{model['image_size']} latents of"
            f" autoencoder {config.autoencoder['identity'][:16]}",
            highlight=False,
        )
    if config.require_dp_epsilon is not None:
        out.print(
            f"  experts are signed only if differentially private with epsilon <= {config.require_dp_epsilon:g}",
            highlight=False,
        )
    print(f"TLS certificate fingerprint: {home_fingerprint(made)}")
    out.print("  islands and downloaders pass it with --tls-fingerprint", highlight=False)
    out.print("signing key fingerprint:")
    print(fingerprint)


@app.command()
def serve(
    home: Path = typer.Option(None, help=HOME_HELP),
    listen: str = typer.Option("127.0.0.1:50051", help="HOST:PORT to listen on (0.0.0.0:PORT for every interface)."),
    tls_cert: Path = typer.Option(
        None, help="Serve this certificate chain (PEM, e.g. CA-issued) instead of the home's own; needs --tls-key."
    ),
    tls_key: Path = typer.Option(None, help="The private key of --tls-cert (unencrypted PEM)."),
    client_ca: Path = typer.Option(
        None, help="Mutual TLS: every client must present a certificate signed by this CA (PEM)."
    ),
    no_tls: bool = typer.Option(False, "--no-tls", help="Serve plaintext gRPC; only on loopback unless --insecure."),
    insecure: bool = typer.Option(
        False, "--insecure", help="With --no-tls: allow plaintext on a non-loopback address (a trusted network only)."
    ),
    dashboard: str = typer.Option(
        None,
        help="Serve a read-only web dashboard on HOST:PORT (a PORT alone: on 127.0.0.1). Loopback: plain HTTP, no "
        "login; any other address: HTTPS with the TLS certificate and a login with `invite --role operator`'s token.",
    ),
) -> None:
    """Run the coordinator until interrupted. TLS with the home's certificate unless told otherwise."""
    from protocol.address import is_loopback, split_address

    from .tls import load_server_tls

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        host = split_address(listen)[0]
    except ValueError as exc:
        fail(f"--listen {exc}")
    if insecure and not no_tls:
        fail("--insecure only goes with --no-tls (it allows plaintext beyond loopback); TLS needs neither")
    if no_tls and (tls_cert or tls_key or client_ca):
        fail("--no-tls does not go with --tls-cert, --tls-key or --client-ca")
    if no_tls and not is_loopback(host) and not insecure:
        fail(
            f"refusing to serve plaintext on {listen}, which is not a loopback address: invite tokens, credentials "
            "and data would cross the network unencrypted; drop --no-tls to serve TLS, or add --insecure on a "
            "network you trust"
        )
    try:
        h = _home(home)
        tls = None if no_tls else load_server_tls(h, tls_cert, tls_key, client_ca)
        board = None
        if dashboard is not None:
            from .dashboard.server import dashboard_settings

            cert, key = (None, None) if no_tls else (tls_cert or h.tls_cert_path, tls_key or h.tls_key_path)
            board = dashboard_settings(dashboard, cert, key)
        from .server import CoordinatorServer  # after the checks: it imports torch

        server = CoordinatorServer(h, listen, tls)
    except (DDMError, OSError) as exc:
        fail(str(exc))
    if tls is None and not is_loopback(host):
        err_console.print(
            f"[yellow]warning:[/yellow] serving plaintext on {listen} (--insecure): invite tokens, credentials and "
            "data cross the network unencrypted",
            highlight=False,
            soft_wrap=True,
        )
    server.start()
    web = None
    if board is not None:
        from .dashboard.server import DashboardServer

        try:
            web = DashboardServer(server, board)
            web.start()
        except DDMError as exc:
            server.stop()
            fail(str(exc))
        login = "; log in with a token from `ddm-coordinator invite --role operator`" if board.login else ""
        err_console.print(f"dashboard at {web.url}{login}", highlight=False, soft_wrap=True)
    if tls is None:
        mode = "plaintext"
    elif tls.client_ca is None:
        mode = f"TLS, certificate {tls.fingerprint}"
    else:
        mode = f"mTLS, certificate {tls.fingerprint}, clients need a certificate from {client_ca}"
    where = f"{listen.rsplit(':', 1)[0]}:{server.port}"
    err_console.print(
        f"coordinator listening on {where} ({mode}), signing key {server.key.fingerprint}",
        highlight=False,
        soft_wrap=True,
    )

    stopping = []

    def shutdown(signum, frame):
        # A second signal while stopping returns at once: re-entering stop() from the handler
        # could wait for a lock that the interrupted first stop() holds.
        if stopping:
            return
        stopping.append(signum)
        if web is not None:
            web.stop()
        server.stop()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    server.wait()


@app.command()
def tls(
    home: Path = typer.Option(None, help=HOME_HELP),
    name: list[str] = typer.Option(
        None, help="A DNS name or IP address islands reach this machine by, for the certificate (repeatable)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace the home's certificate: islands must pin the new one."),
) -> None:
    """Create the home's TLS key and self-signed certificate (init does it; this is for homes made
    without one, or to replace it). Prints its fingerprint (the last line)."""
    from .tls import write_certificate

    try:
        h = _home(home)
        h.load_config()
        if h.tls_cert_path.exists() and not force:
            fail(f"{h.tls_cert_path} exists; pass --force to replace it (every island must then pin the new one)")
        fingerprint = write_certificate(h, list(name or ()))
    except (DDMError, OSError) as exc:
        fail(str(exc))
    out.print(f"wrote {h.tls_cert_path} and {h.tls_key_path}; islands pass --tls-fingerprint", highlight=False)
    out.print("TLS certificate fingerprint:")
    print(fingerprint)


for command in (
    cli_registry.invite,
    cli_registry.status,
    cli_registry.events,
    cli_registry.revoke,
    cli_registry.check,
    cli_registry.assemble,
    cli_registry.migrate,
):
    app.command()(command)


@app.command()
def distill(
    home: Path = typer.Option(None, help=HOME_HELP),
    steps: int = typer.Option(None, min=1, help="Distillation steps (default: the experts' steps)."),
    preset: str = typer.Option(None, help="Student model preset (default: the experts')."),
    data_weight: float = typer.Option(
        None, min=0.0, help="Weight of the flow-matching term on real data (default 0.25; siloed: 0)."
    ),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    threads: int = typer.Option(None, min=1, help="CPU threads for training."),
) -> None:
    """Distill the latest published ensemble into one dense student and publish it beside the
    ensemble, in a new signed manifest version."""
    import torch

    from .distill import DistillOptions, describe
    from .distill import distill as run_distill

    if threads:
        torch.set_num_threads(threads)
    try:
        report = run_distill(_home(home), DistillOptions(steps, preset, data_weight, device), progress=True)
    except (DDMError, OSError) as exc:
        fail(str(exc))
    out.print(describe(report), highlight=False, soft_wrap=True)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("ddm-demo"), "--out", help="Folder for the coordinator, islands and results."),
    experts: int = typer.Option(4, min=2, help="Number of islands, clusters and experts."),
    preset: str = typer.Option("small", help="Expert model preset."),
    steps: int = typer.Option(1200, min=1, help="Training steps per expert."),
    router_steps: int = typer.Option(
        None, min=1, help="Router training steps (default: 0.04 of the experts' training FLOPs, as `init`)."
    ),
    routing: str = typer.Option(
        "ancestral",
        help="Routing when sampling: ancestral (one expert per sample, drawn from the cluster shares), full, top1,"
        " top2, ...",
    ),
    samples: int = typer.Option(1000, min=2, help="Samples for the Fréchet distance (the grid shows 100)."),
    sampling_steps: int = typer.Option(20, min=1, help="ODE steps per sample."),
    seed: int = typer.Option(0, help="Seed for clustering, training and sampling."),
    dashboard: str = typer.Option(
        None, help="Serve the coordinator's dashboard on this loopback HOST:PORT (or PORT) while the demo runs."
    ),
) -> None:
    """Run the whole system on this machine: a coordinator on loopback, one island process per
    expert on the built-in digits, then assemble, download, verify and sample."""
    from .demo import DemoSettings, run_demo

    try:
        settings = DemoSettings(out_dir, experts, preset, steps, router_steps, routing, samples, sampling_steps, seed)
        settings.dashboard = dashboard
        run_demo(settings)
    except (DDMError, OSError) as exc:
        fail(str(exc))


@app.command("flower-app")
def flower_app(
    directory: Path = typer.Argument(..., help="Folder to write the app's pyproject.toml in (new or empty)."),
    home: Path = typer.Option(None, help=HOME_HELP),
    expert_timeout_s: float = typer.Option(
        43200.0, min=1.0, help="How long a node may take to train and return an expert (the message TTL)."
    ),
    wait_for_nodes_s: float = typer.Option(
        600.0, min=0.0, help="How long a run waits for a node that can take the open experts before it ends."
    ),
    listen: str = typer.Option(
        "", help="Also serve ddm's gRPC port here (HOST:PORT), for nodes that can reach it to upload through."
    ),
    address: str = typer.Option("", help="With --listen: the address nodes dial (default: --listen)."),
) -> None:
    """Write the Flower app directory for `flwr run`: a pyproject.toml naming ddm's ServerApp and
    ClientApp, with this home in its run config. Each machine of the federation needs ddm with its
    flower extra installed."""
    from .flower_project import RunSettings, write_app
    from .home import HomeError

    try:
        h = _home(home)
        if not h.exists():
            raise HomeError(f"{h.root} is not a coordinator home; run `ddm-coordinator init` first")
        config = h.load_config()
        if config.autoencoder:
            raise HomeError(
                f"{h.root} trains latent experts, which ddm's Flower app does not carry yet;"
                " serve it with `ddm-coordinator serve` and let islands `ddm-client join`"
            )
        if config.require_dp_epsilon is not None:
            raise HomeError(
                f"{h.root} requires differentially private experts, which ddm's Flower nodes do not train yet;"
                " serve it with `ddm-coordinator serve` and let islands `ddm-client join --dp-epsilon`"
            )
        settings = RunSettings(
            home=h.root.resolve(),
            expert_timeout_s=expert_timeout_s,
            wait_for_nodes_s=wait_for_nodes_s,
            listen=listen,
            address=address,
        )
        path = write_app(directory, settings)
    except (DDMError, OSError) as exc:
        fail(str(exc))
    out.print(f"wrote {path}; run it with `flwr run {directory} YOUR-FEDERATION`", highlight=False, soft_wrap=True)


@app.command()
def version() -> None:
    """Print the ddm version."""
    out.print(f"ddm {__version__}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
