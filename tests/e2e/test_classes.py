"""Class conditioning's refusals and defaults. The whole class-conditional path, end to end
(islands that train class-conditional experts, a class-conditional router, cluster shares in the
signed manifest, `ddm-client sample --class N --cfg S`), runs in tests/e2e/test_latent.py, in
latent space, where it acts as in pixel space."""

import numpy as np
import pytest

from tests.helpers import one_line_exit


@pytest.mark.slow
def test_class_conditioning_needs_labelled_data(run, tmp_path):
    data = tmp_path / "unlabelled.npz"
    np.savez(data, images=np.zeros((40, 8, 8), dtype=np.uint8))
    home = tmp_path / "home"
    result = run("ddm-coordinator", "init", "--home", home, "--dataset", data, "--class-conditional", "--experts", "2")
    one_line_exit(result, "--class-conditional needs labelled data")
    assert not home.exists()
    siloed = ["--mode", "siloed", "--image-size", "8", "--channels", "1", "--class-conditional"]
    one_line_exit(run("ddm-coordinator", "init", "--home", home, *siloed), "needs --classes N")
    one_line_exit(run("ddm-coordinator", "init", "--home", home, "--classes", "3"), "--classes goes with")


def test_ancestral_routing_is_the_default():
    import inspect

    from client.cli import sample
    from client.sample import SampleOptions
    from coordinator.demo import DemoSettings

    assert inspect.signature(sample).parameters["routing"].default.default == "ancestral"
    assert SampleOptions().routing == "ancestral" and DemoSettings(out=None).routing == "ancestral"
