"""What every ``ddm-coordinator`` command shares: the Typer app, the consoles, one-line
errors, and a home opened with its registry."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console

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


def home_of(home: Path | None):
    from .home import Home, resolve_home

    return Home(resolve_home(home))


@contextmanager
def opened(home: Path | None) -> Iterator[tuple]:
    """(home, its config, its registry) for the body of a command; the registry is closed however
    the body ends, and a user's error (DDMError, OSError) ends the command in one line."""
    from .registry import Registry

    registry = None
    try:
        h = home_of(home)
        config = h.load_config()
        registry = Registry(h.database_url(config), lease_seconds=config.lease_seconds)
        yield h, config, registry
    except (DDMError, OSError) as exc:
        fail(str(exc))
    finally:
        if registry is not None:
            registry.close()
