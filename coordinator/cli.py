"""``ddm-coordinator``: the coordinator's command line."""

from __future__ import annotations

from pathlib import Path

import typer

from ddm_model import __version__
from ddm_model.errors import DDMError
from ddm_model.progress import console

app = typer.Typer(
    help="Coordinate a Decentralized Diffusion Model: cluster the data, lease experts to islands, "
    "validate and sign their checkpoints, train the router and publish the ensemble.",
    no_args_is_help=True,
    add_completion=False,
)


def fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


@app.command()
def demo(
    out: Path = typer.Option(Path("ddm-demo"), help="Folder for checkpoints, resume state and the PNG grid."),
    experts: int = typer.Option(4, min=2, help="Number of clusters, and so of experts."),
    preset: str = typer.Option("small", help="Expert model preset."),
    steps: int = typer.Option(1200, min=1, help="Training steps per expert."),
    router_preset: str = typer.Option("small", help="Router model preset."),
    router_steps: int = typer.Option(2000, min=1, help="Router training steps."),
    routing: str = typer.Option("top2", help="Routing at sampling time: full, top1, top2, ..."),
    samples: int = typer.Option(1000, min=2, help="Samples drawn for the Fréchet distance (the grid shows 100)."),
    sampling_steps: int = typer.Option(20, min=1, help="ODE steps per sample."),
    sampler: str = typer.Option("euler", help="ODE sampler: euler or heun."),
    seed: int = typer.Option(0, help="Seed for clustering, training and sampling."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Train a small ensemble on the built-in digits in this process and write a PNG grid.

    Clusters the data, trains one expert per cluster on that cluster only, trains the router,
    samples the routed ensemble and prints its Fréchet distance. Re-running with the same
    folder resumes from the resume state kept there.
    """
    from .demo import DemoSettings, run_demo

    try:
        run_demo(
            DemoSettings(
                out,
                experts,
                preset,
                steps,
                router_preset,
                router_steps,
                routing,
                samples,
                sampling_steps,
                sampler,
                seed,
                device,
            )
        )
    except DDMError as exc:
        fail(str(exc))


@app.command()
def version() -> None:
    """Print the ddm version."""
    console.print(f"ddm {__version__}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
