"""The coordinator tests' shared setup: a real server on loopback over a copy of one tiny
shared-mode home, initialised once per module, whose time moves only when a test moves it."""

import shutil

import pytest
import torch

from coordinator.bootstrap import InitOptions, init_home
from coordinator.clock import ManualClock
from coordinator.home import Home
from coordinator.server import CoordinatorServer

STEPS = 30  # enough for a tiny expert to beat an untrained one on its probe slice


@pytest.fixture(scope="module")
def one_thread():
    """Training a tiny expert is fastest on one thread, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("template") / "home"
    init_home(InitOptions(home=root, experts=3, preset="tiny", steps=STEPS, router_preset="tiny", router_steps=5))
    return root


@pytest.fixture
def server(template, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(template, home)
    srv = CoordinatorServer(Home(home), "127.0.0.1:0", clock=ManualClock())
    srv.start()
    srv.address = f"127.0.0.1:{srv.port}"
    yield srv
    srv.stop(grace=0)
