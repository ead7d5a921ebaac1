"""Fuzzing the checkpoint reader: whatever a stranger puts in a file, the header and its ddm
description either parse or are refused with CheckpointError, one line, and nothing else.

The descriptions are generated as JSON text, not through ``json.dumps``, so that they can hold
what an attacker writes and Python would never produce: integers of thousands of digits, NaN
and Infinity, nesting tens of thousands of levels deep, every field of every wrong type.

Run with more examples: ``DDM_FUZZ_EXAMPLES=5000 pytest tests/ddm_model/test_checkpoint_fuzz.py``.
"""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddm_model.checkpoint import (
    FORMAT,
    CheckpointError,
    CheckpointInfo,
    model_config,
    read_checkpoint_header,
    verify_checkpoint,
)
from ddm_model.dit import ConfigError, DiT, DiTConfig
from ddm_model.router import RouterConfig

EXAMPLES = int(os.environ.get("DDM_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
CONFIG = DiTConfig("tiny", 8, 1, num_classes=10)
ROUTER = RouterConfig("tiny", 8, 1, 4)
FIELDS = ("format", "kind", "model", "cluster_id", "steps", "flops", "data_fingerprint", "metrics")


# -- JSON text, as an attacker writes it -------------------------------------------------------

scalars = st.one_of(
    st.sampled_from(["null", "true", "false", "NaN", "Infinity", "-Infinity", "1e999", "-0", "0.5", "1E-400"]),
    st.integers(-(2**70), 2**70).map(str),
    st.integers(1, 6000).map(lambda n: "9" * n),  # past int_max_str_digits (4300) from 4301 on
    st.integers(1, 400).map(lambda n: "1" + "0" * n + ".5e" + str(n)),
    st.text(max_size=30).map(json.dumps),
    st.sampled_from(["expert", "router", "student", FORMAT, "tiny", "XL/2"]).map(json.dumps),
)


def deep(n: int, opener: str) -> str:
    closer = {"[": "]", '{"a":': "}"}[opener]
    return opener * n + "0" + closer * n


nested = st.tuples(st.integers(1, 60_000), st.sampled_from(["[", '{"a":'])).map(lambda p: deep(*p))
keys = st.one_of(st.sampled_from((*FIELDS, "preset", "image_size", "counts", "")), st.text(max_size=10))
values = st.recursive(
    st.one_of(scalars, nested),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(st.tuples(keys, inner), max_size=4).map(
            lambda kv: "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in kv) + "}"
        ),
    ),
    max_leaves=8,
)


def config_text(config: dict) -> st.SearchStrategy[str]:
    """A real config with some fields replaced by hostile values, some dropped, some added."""
    fields = [*sorted(config), "hidden", "depth", "extra"]
    return st.dictionaries(st.sampled_from(fields), values, max_size=3).flatmap(
        lambda changes: st.sets(st.sampled_from(sorted(config)), max_size=1).map(
            lambda dropped: (
                "{"
                + ",".join(
                    f"{json.dumps(k)}:{changes.get(k, json.dumps(v))}"
                    for k, v in {**config, **dict.fromkeys(changes)}.items()
                    if k not in dropped
                )
                + "}"
            )
        )
    )


good_fields = {
    "format": json.dumps(FORMAT),
    "kind": json.dumps("expert"),
    "model": json.dumps(CONFIG.to_dict()),
    "cluster_id": "2",
    "steps": "3",
    "flops": "0",
    "data_fingerprint": json.dumps("f" * 64),
    "metrics": "{}",
}


@st.composite
def descriptions(draw) -> str:
    """A description object: each field kept, made hostile or left out, in any order."""
    parts = []
    for name in draw(st.permutations(FIELDS)):
        choice = draw(st.sampled_from(["keep", "keep", "hostile", "drop"]))
        if choice == "drop":
            continue
        if choice == "keep":
            value = good_fields[name]
        elif name == "model":
            value = draw(st.one_of(config_text(CONFIG.to_dict()), config_text(ROUTER.to_dict()), values))
        else:
            value = draw(values)
        parts.append(f"{json.dumps(name)}:{value}")
    if draw(st.booleans()):
        parts.append(f"{json.dumps(draw(keys))}:{draw(values)}")
    return "{" + ",".join(parts) + "}"


texts = st.one_of(descriptions(), values, st.text(max_size=200))


def refused_or_parsed(call):
    """Run ``call``; a refusal must be a CheckpointError of one line. Returns its result or None."""
    try:
        return call()
    except CheckpointError as exc:
        message = str(exc)
        assert message and "\n" not in message, repr(message[:300])
        return None


# -- the description alone --------------------------------------------------------------------


@FUZZ
@given(texts)
def test_a_description_parses_or_is_refused(text):
    info = refused_or_parsed(lambda: CheckpointInfo.from_json(text, "fuzz"))
    if info is not None:
        assert info.kind in ("expert", "router", "student")
        with contextlib.suppress(ConfigError):  # verify_checkpoint makes it a one-line CheckpointError
            model_config(info.kind, info.model)


def description(**fields: str) -> str:
    """A description with the given fields as JSON text, after a valid format."""
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in {"format": json.dumps(FORMAT), **fields}.items()) + "}"


@pytest.mark.parametrize(
    "text",
    [
        "[" * 50_000 + "]" * 50_000,
        description(kind='"expert"', model="{}", metrics=deep(50_000, '{"a":')),
        description(kind='"expert"', model="{}", steps="9" * 5000),
        description(kind='["expert"]', model="{}"),
        description(kind='"expert"', model=deep(900, "[")),
    ],
    ids=["deep-array", "deep-metrics", "huge-int", "kind-a-list", "model-nested-900"],
)
def test_hostile_descriptions_found_so_far_are_refused(text):
    with pytest.raises(CheckpointError):
        CheckpointInfo.from_json(text, "hostile")


# -- whole files: the safetensors header, its metadata, the description in it ------------------


class Table:
    """The tiny expert's tensor table and body (a plain class: hypothesis prints it in one line)."""

    def __init__(self):
        self.header, self.body, offset = {}, b"", 0
        for name, tensor in DiT(CONFIG).state_dict().items():
            data = tensor.to(torch.float32).contiguous().numpy().tobytes()
            self.header[name] = {
                "dtype": "F32",
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + len(data)],
            }
            self.body += data
            offset += len(data)

    def __repr__(self) -> str:
        return f"Table({len(self.header)} tensors)"


@pytest.fixture(scope="module")
def table() -> Table:
    """Headers that are right but for the fuzzed part start from this."""
    return Table()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "fuzzed.safetensors"


def file_of(header: bytes, body: bytes, length: int | None = None) -> bytes:
    header += b" " * (-len(header) % 8)
    return (len(header) if length is None else length).to_bytes(8, "little") + header + body


def check_file(path, data: bytes) -> None:
    path.write_bytes(data)
    refused_or_parsed(lambda: read_checkpoint_header(path))
    refused_or_parsed(lambda: verify_checkpoint(path, expect_kind="expert", expect_config=CONFIG.to_dict()))


def test_a_config_field_named_with_a_line_break_is_refused_in_one_line(table, scratch):
    """Found by the fuzzer: the config's unknown field names were quoted raw, line breaks and all."""
    text = description(kind='"expert"', model=json.dumps({**CONFIG.to_dict(), "x\nsigned: yes": 1}))
    header = {**table.header, "__metadata__": {"ddm": text}}
    scratch.write_bytes(file_of(json.dumps(header).encode(), table.body))
    with pytest.raises(CheckpointError, match="unknown fields") as err:
        verify_checkpoint(scratch)
    assert "\n" not in str(err.value)


metadata_values = st.one_of(texts.map(json.dumps), values)  # as a JSON string, or (wrongly) raw JSON


@FUZZ
@given(st.dictionaries(st.one_of(st.just("ddm"), keys), metadata_values, max_size=3))
def test_any_metadata_in_a_real_header_is_parsed_or_refused(table, scratch, metadata):
    entries = [f"{json.dumps(k)}:{json.dumps(v)}" for k, v in table.header.items()]
    entries.append('"__metadata__":{' + ",".join(f"{json.dumps(k)}:{v}" for k, v in metadata.items()) + "}")
    check_file(scratch, file_of(("{" + ",".join(entries) + "}").encode(), table.body))


@FUZZ
@given(st.binary(max_size=300), st.one_of(st.none(), st.integers(0, 2**64 - 1)), st.binary(max_size=64))
def test_any_header_bytes_are_parsed_or_refused(scratch, header, length, body):
    check_file(scratch, file_of(b"{" + header, body, length))


def int_list(low: int, high: int) -> st.SearchStrategy[str]:
    return st.lists(st.integers(low, high), max_size=4).map(json.dumps)


tensor_entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(
            st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X"]).map(json.dumps), values
        ),
        "shape": st.one_of(int_list(-(2**64), 2**64), int_list(0, 64), values),
        "data_offsets": st.one_of(int_list(-(2**64), 2**64), int_list(0, 50_000), values),
    },
)


@FUZZ
@given(st.data())
def test_a_tensor_table_that_lies_is_parsed_or_refused(table, scratch, data):
    header = {name: json.dumps(entry) for name, entry in table.header.items()}
    for name in data.draw(st.lists(st.sampled_from(sorted(header)), min_size=1, max_size=3, unique=True)):
        entry = data.draw(tensor_entries)
        header[name] = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in entry.items()) + "}"
    description = CheckpointInfo("expert", CONFIG.to_dict(), 2, 3).to_json()
    header["__metadata__"] = json.dumps({"ddm": description})
    raw = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in header.items()) + "}"
    check_file(scratch, file_of(raw.encode(), table.body))
