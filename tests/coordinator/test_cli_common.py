"""The coordinator CLI's shared plumbing: a command's registry is closed however it ends."""

import os

import psutil
import pytest
import typer

from coordinator.cli_common import opened
from ddm_model.errors import DDMError


def database_files_open(home) -> list[str]:
    """The registry files this process holds open (SQLite keeps the database and its WAL open)."""
    root = os.path.realpath(home)
    return [f.path for f in psutil.Process().open_files() if os.path.realpath(f.path).startswith(root)]


def test_a_commands_registry_is_closed_when_it_fails(template):
    assert database_files_open(template) == []
    with pytest.raises(typer.Exit) as exit_, opened(template) as (_, _, registry):
        assert registry.experts()  # the registry is open and read
        assert database_files_open(template) != []
        raise DDMError("a refusal inside the command")
    assert exit_.value.exit_code == 2
    assert database_files_open(template) == []


def test_a_commands_registry_is_closed_when_it_succeeds(template):
    with opened(template) as (_, _, registry):
        registry.experts()
    assert database_files_open(template) == []
