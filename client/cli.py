"""``ddm-client``: the island's command line."""

from __future__ import annotations

import typer

from ddm_model import __version__
from ddm_model.progress import console

app = typer.Typer(
    help="Join a ddm coordinator as an island: train an expert locally on its cluster and upload only "
    "the finished checkpoint; download, verify and sample published ensembles.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def island() -> None:
    """Join a ddm coordinator as an island, or download and sample a published ensemble."""


@app.command()
def version() -> None:
    """Print the ddm version."""
    console.print(f"ddm {__version__}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
