"""Helpers shared by the test modules."""

import importlib.util
import os

import pytest


def one_line_error(excinfo) -> str:
    """The message of a raised error, asserted to be one non-empty line."""
    message = str(excinfo.value)
    assert message, "empty error message"
    assert "\n" not in message, f"error message spans several lines: {message!r}"
    return message


def one_line_exit(result, *words) -> None:
    """A command that failed with exit 2 and one line on stderr holding ``words``."""
    assert result.returncode == 2, result.stdout[-1000:] + result.stderr[-1000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def require_module(module: str, required_by: str, why: str) -> None:
    """Skip the calling test module when ``module`` is not installed, saying ``why``; fail it
    instead when the environment variable ``required_by`` is set (CI sets it), so that nothing
    is hidden there. Call it before importing the module."""
    if importlib.util.find_spec(module) is not None:
        return
    if os.environ.get(required_by):
        pytest.fail(f"{required_by} is set but {why}", pytrace=False)
    pytest.skip(why, allow_module_level=True)
