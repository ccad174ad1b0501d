"""The wire contract follows engine.request.FIELDS: the inputs, the generated config.pbtxt, the README tables, the
client's tensors and their parsing back all agree, and a new field reaches each of them with no other edit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from engine import request as contract
from engine.request import FIELDS, make_request
from engine.tiny import resolve_checkpoint
from engine.validation import RequestLimits
from server import protocol
from server.client import GenerationInputs
from server.repository import RepositoryOptions, build_repository
from tests.engine.test_request import MOTION

ROOT = Path(__file__).resolve().parents[2]


def _mvgen_inputs(tmp_path, cache_root) -> dict[str, model_config_pb2.ModelInput]:
    model, adapter = resolve_checkpoint("tiny", None, cache_root)
    repo = build_repository(tmp_path / "repo", RepositoryOptions(model=str(model), adapter=str(adapter)))
    config = text_format.Parse((repo / "mvgen" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return {i.name: i for i in config.input}


def test_the_inputs_are_the_fields_wire_forms():
    assert [f.name for f in protocol.INPUTS] == [w.name for f in FIELDS for w in f.wire]
    by_name = {f.name: f for f in protocol.INPUTS}
    assert not by_name["prompt"].optional and by_name["prompt"].required == "yes"
    assert by_name["first_frame"].required == by_name["first_frame_rgb"].required == "I2V models: one of the two"
    assert by_name["first_frame"].optional and by_name["references"].required == "no"
    assert by_name["ref_size"].wire_type == "INT32" and by_name["ref_size"].dims == (2,)


def test_every_field_is_an_input_of_the_generated_config(tmp_path, tiny_cache):
    inputs = _mvgen_inputs(tmp_path, tiny_cache)
    for field in FIELDS:
        one_of_two = len(field.wire) > 1  # an image: Triton requires neither form, the model one of them
        for wire in field.wire:
            tensor = inputs.pop(wire.name)
            assert model_config_pb2.DataType.Name(tensor.data_type) == wire.triton_type
            assert list(tensor.dims) == list(wire.dims)
            assert tensor.optional == (not field.required or one_of_two)
    assert not inputs


@pytest.mark.parametrize("readme", ["README.md", "server/README.md"])
def test_the_readme_tables_are_the_generated_one(readme):
    lines = (ROOT / readme).read_text().splitlines()
    start = lines.index("| name | in/out | datatype | shape | required | meaning |")
    end = lines.index("", start)
    assert "\n".join(lines[start:end]) == protocol.markdown_table(), f"regenerate {readme}'s table"


def _round_trip(inputs: GenerationInputs) -> dict:
    tensors = inputs.tensors()
    return protocol.request_arguments(tensors.get)


def test_client_tensors_parse_back_into_the_same_request():
    rng = np.random.default_rng(11)
    first = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    refs = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    values = dict(prompt="a person turns", negative_prompt="blur", first_frame=first, references=refs,
                  first_frame_mask=np.full((48, 40), 255, np.uint8), num_frames=5, height=32, width=48, steps=2,
                  guidance_scale=4.5, guidance_scale_2=3.5, seed=2**63 + 5, shift=5.0, ref_size=(32, 32),
                  frame_pose=[rng.integers(0, 256, (24, 16, 3), dtype=np.uint8) for _ in range(5)],
                  reference_poses=refs, identity=first, view_omega=[0.25, 1.5], guidance="phantom",
                  guidance_scale_image=4.0, reference_fit="letterbox")
    parsed = _round_trip(GenerationInputs(**values))
    assert set(parsed) == {f.name for f in FIELDS}
    # limits that take every field (two experts, every seed method's inputs)
    limits = RequestLimits(max_references=3, experts=2, prototype=True, identity=True, multiview=True)
    direct, wired = make_request({}, limits, **values), make_request({}, limits, **parsed)
    for field in FIELDS:
        assert _same(getattr(direct, field.name), getattr(wired, field.name)), field.name


def _same(a, b) -> bool:
    if isinstance(a, tuple) and a and isinstance(a[0], np.ndarray):
        return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    return np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b


def test_unset_fields_stay_off_the_wire():
    tensors = GenerationInputs(prompt="x", first_frame=b"png bytes").tensors()
    assert set(tensors) == {"prompt", "first_frame"}
    with pytest.raises(TypeError, match="missing required request field"):
        GenerationInputs(first_frame=b"png bytes")
    assert set(GenerationInputs(prompt="x").tensors()) == {"prompt"}  # a T2V request: no first frame
    with pytest.raises(TypeError, match="unknown request field"):
        GenerationInputs(prompt="x", first_frame=b"png", colour="red")


def test_a_new_field_reaches_the_wire_with_no_other_edit(monkeypatch, tmp_path, tiny_cache):
    monkeypatch.setattr(contract, "FIELDS", FIELDS + (MOTION,))
    monkeypatch.setattr(protocol, "INPUTS", protocol.inputs())  # what importing protocol computes
    inputs = _mvgen_inputs(tmp_path, tiny_cache)
    assert model_config_pb2.DataType.Name(inputs["motion_scale"].data_type) == "TYPE_FP32"
    assert inputs["motion_scale"].optional
    assert "| `motion_scale` | input | FP32 | [1] | no | motion strength: a number > 0; default: 1.0 |" \
        in protocol.markdown_table()
    tensors = GenerationInputs(prompt="x", first_frame=b"png", motion_scale=2.5).tensors()
    assert tensors["motion_scale"].dtype == np.float32
    assert _round_trip(GenerationInputs(prompt="x", first_frame=b"png", motion_scale=2.5))["motion_scale"] == 2.5
