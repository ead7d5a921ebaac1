"""``ddm-client``: the island's command line."""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from ddm_model import __version__
from ddm_model.errors import DDMError
from ddm_model.progress import console as err_console
from protocol.trust import TrustError

from .state import DEFAULT_STATE_DIR

if TYPE_CHECKING:
    from .tls import TlsSettings

# gRPC's C core prints handshake and connection chatter at INFO; errors reach the user as one line.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

app = typer.Typer(
    help="Join a ddm coordinator as an island: train an expert locally on its cluster and upload only "
    "the finished checkpoint; download, verify and sample published ensembles.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console()

STATE_HELP = "Folder for this island's identity, data and training state (default: $DDM_STATE_DIR or ~/.ddm/island)."

TLS_FINGERPRINT_HELP = (
    "Pin the coordinator's TLS certificate (sha256:..., printed by `ddm-coordinator init`; or $DDM_TLS_FINGERPRINT). "
    "Needed on first contact unless --tls-ca or --insecure; saved in --state-dir for later commands."
)
TLS_CA_HELP = "Verify the coordinator's TLS certificate against this CA (PEM) instead of pinning it."
TLS_CLIENT_CERT_HELP = "Mutual TLS: this island's certificate (PEM), for a coordinator served with --client-ca."
TLS_CLIENT_KEY_HELP = "Mutual TLS: the key of --tls-client-cert (unencrypted PEM)."
INSECURE_HELP = "Speak plaintext gRPC (only to a coordinator started with `serve --no-tls`)."


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def state_dir(value: Path | None) -> Path:
    return value or Path(os.environ.get("DDM_STATE_DIR", DEFAULT_STATE_DIR))


def _flag(name: str, annotation: type, option) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option, annotation=annotation)


TLS_FLAGS = (
    _flag("tls_fingerprint", str, typer.Option(None, help=TLS_FINGERPRINT_HELP)),
    _flag("tls_ca", Path, typer.Option(None, help=TLS_CA_HELP)),
    _flag("tls_client_cert", Path, typer.Option(None, help=TLS_CLIENT_CERT_HELP)),
    _flag("tls_client_key", Path, typer.Option(None, help=TLS_CLIENT_KEY_HELP)),
    _flag("insecure", bool, typer.Option(False, "--insecure", help=INSECURE_HELP)),
)


def tls_flags(command):
    """A command that reaches the coordinator: its ``tls`` parameter becomes the TLS flags
    (--tls-fingerprint, --tls-ca, --tls-client-cert, --tls-client-key, --insecure), listed in
    its place, and the command receives them as one TlsSettings, as given: $DDM_TLS_FINGERPRINT
    and the settings saved with the island's identity fill in the rest later."""
    signature = inspect.signature(command)
    parameters = []
    for parameter in signature.parameters.values():
        parameters.extend(TLS_FLAGS if parameter.name == "tls" else [parameter])

    @functools.wraps(command)
    def with_tls(*, tls_fingerprint, tls_ca, tls_client_cert, tls_client_key, insecure, **options):
        from .tls import TlsSettings

        try:
            tls = TlsSettings(tls_fingerprint, tls_ca, tls_client_cert, tls_client_key, insecure)
        except (DDMError, TrustError, OSError) as exc:
            fail(str(exc))
        return command(tls=tls, **options)

    with_tls.__signature__ = signature.replace(parameters=parameters)
    # typer resolves the other parameters' annotations from these; ``tls`` is no longer one.
    with_tls.__annotations__ = {name: hint for name, hint in command.__annotations__.items() if name != "tls"}
    return with_tls


@app.callback()
def island() -> None:
    """Join a ddm coordinator as an island, or download and sample a published ensemble."""


@app.command()
@tls_flags
def join(
    coordinator: str = typer.Option(..., help="HOST:PORT of the coordinator."),
    token: str = typer.Option(
        None, envvar="DDM_TOKEN", help="Invite token, needed only the first time (or $DDM_TOKEN, kept out of `ps`)."
    ),
    state_dir_: Path = typer.Option(None, "--state-dir", help=STATE_HELP),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    nproc_per_node: int = typer.Option(
        1,
        "--nproc-per-node",
        help="Train each expert with DDP over this many local processes: one per GPU with --device cuda"
        " (rank r on cuda:r), or CPU processes over gloo. The lease's batch is split between them.",
    ),
    once: bool = typer.Option(False, "--once", help="Exit after one expert instead of asking for more work."),
    name: str = typer.Option("", help="A name for this island in the coordinator's status."),
    dataset: str = typer.Option(
        None,
        help="A local copy of the dataset ('digits', 'fashion-mnist[-test][:FOLDER]', .npz or folder):"
        " receive index lists.",
    ),
    fingerprint: str = typer.Option(None, help="Pin the coordinator's signing key (sha256:...) when enrolling."),
    threads: int = typer.Option(None, min=1, help="CPU threads for training (per process with --nproc-per-node)."),
    data: str = typer.Option(
        None,
        help="Siloed mode: this island's own data (image folder, .npz or 'fashion-mnist[-test][:FOLDER]');"
        " it never leaves.",
    ),
    tls: TlsSettings = None,
    share_counts: bool = typer.Option(
        False,
        "--share-counts",
        help="Siloed mode: report this island's sample count (and per-class counts) with its checkpoint, so the"
        " ensemble draws its expert in proportion to the data; without it the coordinator uses uniform shares.",
    ),
    dp_epsilon: float = typer.Option(
        None,
        help="Train with differential privacy (DP-SGD, Opacus): the expert is (epsilon, delta)-DP with respect to"
        " each sample this island trains on.",
    ),
    dp_delta: float = typer.Option(None, help="With --dp-epsilon: delta (default 1e-5, or 0.1/N for a larger silo)."),
    dp_clip: float = typer.Option(1.0, help="With --dp-epsilon: each sample's gradient is clipped to this norm."),
    dp_noise_pairs: int = typer.Option(
        1, help="With --dp-epsilon: noise/time draws per sample and step, averaged before clipping."
    ),
    dp_accountant: str = typer.Option("rdp", help="With --dp-epsilon: the privacy accountant, rdp or prv."),
) -> None:
    """Enroll, take a lease, train the expert locally, upload it, and repeat (or stop with --once)."""
    from ddm_model.privacy import DPConfig

    from .island import JoinOptions, run_island

    try:
        dp = None
        if dp_epsilon is not None:
            dp = DPConfig(dp_epsilon, dp_delta, dp_clip, dp_noise_pairs, dp_accountant)
        elif dp_delta is not None:
            raise DDMError("--dp-delta goes with --dp-epsilon")
        code = run_island(
            JoinOptions(
                coordinator=coordinator,
                state_dir=state_dir(state_dir_),
                token=token,
                name=name or os.uname().nodename,
                device=device,
                once=once,
                dataset=dataset,
                fingerprint=fingerprint,
                threads=threads,
                tls=tls,
                data=data,
                share_counts=share_counts,
                nproc_per_node=nproc_per_node,
                dp=dp,
            )
        )
    except (DDMError, TrustError, OSError) as exc:
        fail(str(exc))
    raise typer.Exit(code)


@app.command()
@tls_flags
def download(
    coordinator: str = typer.Option(..., help="HOST:PORT of the coordinator."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the ensemble."),
    fingerprint: str = typer.Option(None, help="The coordinator's signing key fingerprint (sha256:...) to pin."),
    token: str = typer.Option(
        None,
        envvar="DDM_TOKEN",
        help="A reader (or island) invite, if the state folder holds no identity ($DDM_TOKEN).",
    ),
    state_dir_: Path = typer.Option(None, "--state-dir", help=STATE_HELP),
    tls: TlsSettings = None,
) -> None:
    """Fetch the published ensemble (resumable) and verify every signature and hash."""
    from protocol.manifest import Manifest

    from .ensemble import download_ensemble

    try:
        folder = download_ensemble(coordinator, out_dir, state_dir(state_dir_), fingerprint, token, tls)
    except (DDMError, TrustError, OSError) as exc:
        fail(str(exc))
    out.print(f"verified ensemble in {folder}")
    private = Manifest.parse((folder / "manifest.json").read_bytes()).privacy
    if private:
        out.print(
            f"differentially private: epsilon {private['epsilon']:.3g}, delta {private['delta']:.2g} for"
            f" {private['unit']} (every one of its {private['experts']} experts declares a guarantee)",
            highlight=False,
        )


@app.command()
def sample(
    folder: Path = typer.Argument(..., help="A folder written by `ddm-client download`."),
    n: int = typer.Option(64, "--n", min=1, help="Number of samples (the PNG shows the first 100)."),
    routing: str = typer.Option(
        "ancestral",
        help="ancestral (one expert per sample, drawn from the signed cluster shares, or p(k | class) with --class;"
        " no router needed), or per step: full, top1, top2, ... (the ensemble only).",
    ),
    class_label: int = typer.Option(
        None,
        "--class",
        help="Sample only this class (class-conditional ensembles). Without it, samples use the null label"
        " (unconditional), following the data's class balance.",
    ),
    cfg: float = typer.Option(1.0, "--cfg", help="Classifier-free guidance scale towards --class (1.0: none)."),
    model: str = typer.Option("ensemble", help="ensemble (the routed experts) or student (the distilled model)."),
    steps: int = typer.Option(20, min=1, help="ODE steps."),
    sampler: str = typer.Option("euler", help="euler or heun."),
    seed: int = typer.Option(0, help="Seed for the noise."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    fingerprint: str = typer.Option(None, help="Trust this key (sha256:...) instead of those pinned in --state-dir."),
    state_dir_: Path = typer.Option(None, "--state-dir", help=STATE_HELP),
    out_file: Path = typer.Option(Path("samples.png"), "--out", help="PNG grid to write."),
    npz: Path = typer.Option(None, help="Also save the samples, (N, C, H, W) in [-1, 1], as an .npz 'images' array."),
) -> None:
    """Verify a downloaded ensemble again and write a PNG grid of samples from it (or its student)."""
    from .sample import SampleOptions, sample_to_files
    from .state import IslandState

    try:
        trusted = {fingerprint} if fingerprint else IslandState(state_dir(state_dir_)).pinned_keys()
        opts = SampleOptions(n, routing, steps, sampler, seed, device, model, class_label, cfg)
        path = sample_to_files(folder, trusted, opts, out_file, npz)
    except (DDMError, TrustError, OSError) as exc:
        fail(str(exc))
    out.print(f"wrote {path}" + (f" and {npz}" if npz else ""))


@app.command()
def version() -> None:
    """Print the ddm version."""
    out.print(f"ddm {__version__}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
