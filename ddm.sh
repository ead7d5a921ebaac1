#!/bin/sh
# ddm.sh: ddm from a fresh clone, set-up included.
#
#   ./ddm.sh demo [ARGS...]   the whole system on this machine: ddm-coordinator demo ARGS...
#   ./ddm.sh test [ARGS...]   the test suite, from the repository root: python -m pytest ARGS...
#
# The first run sets up; later runs go straight to the command, until pyproject.toml, this
# script or $TORCH_SPEC/$TORCH_INDEX_URL change. Setting up installs:
#   - Fashion-MNIST, Debian's dataset-fashion-mnist, when /usr/share/datasets/fashion-mnist is
#     absent and $DDM_FASHION_MNIST unset, with apt-get as root or through sudo; where that
#     cannot be done it says what to install and goes on (the tests that read it say so too);
#   - a virtual environment, .venv (or $DDM_VENV), made with python3 (or $PYTHON);
#   - torch: $TORCH_SPEC when set (e.g. torch==2.13.0+cu128), else the torch already in that
#     environment, else torch==2.13.0 (the CPU wheel); from $TORCH_INDEX_URL when set (a GPU
#     build's package index);
#   - for `test` only: Debian's chromium and chromium-driver, the real browser the dashboard's
#     test drives, when /usr/bin/chromium or /usr/bin/chromedriver is absent, with apt-get as
#     root or through sudo; where that cannot be done it says so and goes on (that test skips);
#   - ddm itself, editable, with its test extra, its latent extra (diffusers, for latent experts)
#     and its flower extra (flwr, on Python 3.11 and newer; on 3.10 pip skips it and the Flower
#     tests say they are skipped).
set -eu

ROOT=$(cd "$(dirname "$0")" && pwd)
VENV=${DDM_VENV:-.venv}
case $VENV in /*) ;; *) VENV=$ROOT/$VENV ;; esac
PYTHON=${PYTHON:-python3}
DEFAULT_TORCH=torch==2.13.0
FASHION_MNIST=/usr/share/datasets/fashion-mnist
STAMP=$VENV/.ddm-installed
# What the stamp records: a change of either variable sets up again.
WANTED="torch=${TORCH_SPEC:-} index=${TORCH_INDEX_URL:-}"

say() { printf 'ddm.sh: %s\n' "$*" >&2; }
die() {
    say "$*"
    exit 1
}

usage() {
    cat >&2 <<'EOF'
usage: ./ddm.sh demo [ARGS...]   set up if needed, then run `ddm-coordinator demo ARGS...`
       ./ddm.sh test [ARGS...]   set up if needed, then run `python -m pytest ARGS...`
environment: DDM_VENV (default .venv), PYTHON (default python3), TORCH_SPEC, TORCH_INDEX_URL
EOF
}

# How to run a command as root here: nothing (we are root), sudo (which may ask for a password
# at a terminal), or not at all (fails).
root_prefix() {
    if [ "$(id -u)" = 0 ]; then
        echo ""
    elif command -v sudo >/dev/null 2>&1 && { sudo -n true 2>/dev/null || [ -t 0 ]; }; then
        echo sudo
    else
        return 1
    fi
}

have_fashion_mnist() { [ -n "${DDM_FASHION_MNIST:-}" ] || [ -d "$FASHION_MNIST" ]; }

fashion_mnist_note() {
    say "Fashion-MNIST is missing (the tests and --dataset fashion-mnist read it): install Debian's" \
        "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or set DDM_FASHION_MNIST=FOLDER; going on"
}

# Returns 1 when the data is still missing (and says so).
install_fashion_mnist() {
    have_fashion_mnist && return 0
    if command -v apt-get >/dev/null 2>&1 && sudo=$(root_prefix); then
        say "installing Fashion-MNIST: ${sudo:+sudo }apt-get install dataset-fashion-mnist"
        if $sudo apt-get update -qq; then
            $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null || true
        fi
    fi
    have_fashion_mnist && return 0
    fashion_mnist_note
    return 1
}

have_chromium() { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }

# The dashboard's browser test drives Debian's chromium; nothing downloads a browser of its own.
install_chromium() {
    have_chromium && return 0
    if command -v apt-get >/dev/null 2>&1 && sudo=$(root_prefix); then
        say "installing chromium for the dashboard's browser test: ${sudo:+sudo }apt-get install chromium chromium-driver"
        if $sudo apt-get update -qq; then
            $sudo apt-get install -y -qq chromium chromium-driver >/dev/null || true
        fi
    fi
    have_chromium && return 0
    say "chromium or chromedriver is missing (apt-get install chromium chromium-driver); the dashboard's" \
        "browser test will be skipped; going on"
}

venv_works() { "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }

make_venv() {
    venv_works && return 0
    command -v "$PYTHON" >/dev/null 2>&1 || die "no $PYTHON here: install Python 3.10 or newer (or set PYTHON)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        die "ddm needs Python 3.10 or newer; $PYTHON is $("$PYTHON" -V 2>&1) (set PYTHON to another)"
    say "making the virtual environment $VENV"
    if ! "$PYTHON" -m venv "$VENV" || ! venv_works; then
        die "$PYTHON cannot make a virtual environment with pip (on Debian/Ubuntu: apt-get install python3-venv)"
    fi
}

pip() { "$VENV/bin/python" -m pip "$@"; }

install_torch() {
    if [ -n "${TORCH_SPEC:-}" ]; then
        spec=$TORCH_SPEC
    elif version=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
        say "keeping torch $version"
        return 0
    else
        spec=$DEFAULT_TORCH
    fi
    say "installing $spec${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        pip install --quiet --index-url "$TORCH_INDEX_URL" "$spec"
    else
        pip install --quiet "$spec"
    fi
}

set_up() {
    if [ -f "$STAMP" ] && [ -z "$(find "$ROOT/pyproject.toml" "$ROOT/ddm.sh" -newer "$STAMP")" ] &&
        [ "$(cat "$STAMP")" = "$WANTED" ] && [ -x "$VENV/bin/python" ]; then
        return 0
    fi
    install_fashion_mnist || noted=1
    make_venv
    pip install --quiet --upgrade pip
    install_torch
    say "installing ddm and its test and flower extras"
    (cd "$ROOT" && pip install --quiet -e '.[test,latent,flower]')
    printf '%s\n' "$WANTED" >"$STAMP"
}

case ${1:-} in
demo | test) ;;
-h | --help | help)
    usage
    exit 0
    ;;
*)
    usage
    exit 2
    ;;
esac
verb=$1
shift
noted=0
set_up
if [ "$verb" = demo ]; then
    exec "$VENV/bin/ddm-coordinator" demo "$@"
fi
[ "$noted" = 1 ] || have_fashion_mnist || fashion_mnist_note
install_chromium
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
