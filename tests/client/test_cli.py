"""`ddm-client`'s TLS flags: declared once, offered alike by every command that reaches the
coordinator, and checked before anything is contacted."""

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from client.cli import app

TLS_OPTIONS = ["--tls-fingerprint", "--tls-ca", "--tls-client-cert", "--tls-client-key", "--insecure"]


def options(command: str) -> dict:
    """The command's options by their first name, in the order --help lists them."""
    params = get_command(app).commands[command].params
    return {param.opts[0]: param for param in params if param.param_type_name == "option"}


def test_join_and_download_offer_the_same_tls_flags_in_place():
    join, download = options("join"), options("download")
    for name in TLS_OPTIONS:
        assert join[name].help and join[name].help == download[name].help
    names = list(join)
    first = names.index(TLS_OPTIONS[0])
    assert names[first : first + len(TLS_OPTIONS)] == TLS_OPTIONS
    assert names[first - 1] == "--data" and names[first + len(TLS_OPTIONS)] == "--share-counts"
    assert list(download)[-len(TLS_OPTIONS) :] == TLS_OPTIONS


@pytest.mark.parametrize("command", ["join", "download"])
def test_tls_flags_that_do_not_fit_together_fail_in_one_line(command, tmp_path):
    args = [command, "--coordinator", "127.0.0.1:1", "--state-dir", str(tmp_path), "--insecure", "--tls-ca", "ca.pem"]
    if command == "download":
        args += ["--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: --insecure (plaintext) excludes --tls-fingerprint, --tls-ca and a client certificate"
    ]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--dp-epsilon", "8", "--share-counts"], "--share-counts reports exact data counts"),
        (["--dp-epsilon", "8", "--nproc-per-node", "2"], "--dp-epsilon trains in one process"),
        (["--dp-delta", "1e-6"], "--dp-delta goes with --dp-epsilon"),
        (["--dp-epsilon", "-1"], "--dp-epsilon must lie in (0, 10000)"),
        (["--dp-epsilon", "8", "--dp-accountant", "gdp"], "unknown accountant 'gdp'"),
    ],
)
def test_dp_flags_that_cannot_be_met_fail_in_one_line_before_any_contact(extra, words, tmp_path):
    args = ["join", "--coordinator", "127.0.0.1:1", "--state-dir", str(tmp_path / "state"), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and words in line
    assert not (tmp_path / "state").exists()  # nothing enrolled, nothing written
