"""Shard and clustering files: a description no parser can read is one clear error, whatever it holds."""

import pytest
import torch
from safetensors.torch import save_file

from ddm_model.errors import DDMError
from ddm_model.tensorfile import read_tensor_file, write_tensor_file


class FileError(DDMError):
    pass


def test_a_written_file_reads_back(tmp_path):
    write_tensor_file(tmp_path / "f", {"x": torch.arange(3)}, {"format": "test/1", "n": 3})
    description, tensors = read_tensor_file(tmp_path / "f", "test/1", "test", FileError)
    assert description == {"format": "test/1", "n": 3} and tensors["x"].tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000 + "]" * 100_000, '{"format": "test/1", "n": ' + "9" * 10_000 + "}", "{not json", '"just text"'],
    ids=["nested-deep", "huge-integer", "not-json", "not-an-object"],
)
def test_a_hostile_description_is_one_clear_error(tmp_path, text):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "f"), metadata={"ddm": text})
    with pytest.raises(FileError, match="is not a ddm test file") as err:
        read_tensor_file(tmp_path / "f", "test/1", "test", FileError)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400
