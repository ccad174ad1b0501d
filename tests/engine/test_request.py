"""The request declared once: validation refuses every bad field in one line naming it and the allowed values,
make_request fills the model's defaults, and the command line follows the declaration."""
from __future__ import annotations

import numpy as np
import pytest

from engine import request as contract
from engine.errors import RequestError
from engine.request import FIELDS, MODEL_DEFAULT, GenerationRequest, make_request, validate_request
from engine.validation import RequestLimits

LIMITS = RequestLimits(max_references=3, max_tokens=4096)


def _image(rng, h=32, w=32):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _request(**changes):
    rng = np.random.default_rng(7)
    fields = dict(first_frame=_image(rng), references=[_image(rng)], prompt="p", num_frames=9, height=64, width=64,
                  steps=4, guidance_scale=5.0, seed=0, shift=3.0)
    return validate_request(LIMITS, **{**fields, **changes})


def test_a_good_request_passes_and_decodes_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    path = tmp_path / "frame.png"
    Image.fromarray(_image(rng, 40, 48)).save(path)
    request = _request(first_frame=path, references=[path.read_bytes(), path], first_frame_mask=np.ones((40, 48), bool))
    assert request.first_frame.shape == (40, 48, 3) and request.first_frame.dtype == np.uint8
    assert len(request.references) == 2 and request.first_frame_mask.all()
    assert request.reference_size == (64, 64)


@pytest.mark.parametrize("changes, words", [
    (dict(height=100), "height must be a positive multiple of 16, got 100 (nearest: 96 or 112)"),
    (dict(width=0), "width must be a positive multiple of 16"),
    (dict(height=64.0), "height must be a positive multiple of 16"),
    (dict(num_frames=10), "frames must be 4k+1"),
    (dict(num_frames=0), "frames must be 4k+1"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(steps=True), "steps must be a positive integer"),
    (dict(guidance_scale=-1.0), "guidance_scale must be a number >= 0"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a number >= 0"),
    (dict(seed=-1), "seed must be an integer in [0,"),
    (dict(shift=0), "shift must be a number > 0"),
    (dict(prompt=5), "prompt must be text, got int"),
    (dict(prompt=None), "prompt is required"),
    (dict(ref_size=(64, 40)), "ref_size width must be a positive multiple of 16, got 40 (nearest: 32 or 48)"),
    (dict(ref_size=(64,)), "ref_size must be (height, width), got (64,)"),
    (dict(ref_size=(1024, 1024)), "tokens, more than the limit of 4096"),
    (dict(references=[np.zeros((8, 8, 3), np.uint8)] * 4), "got 4 references, this model takes at most 3"),
    (dict(num_frames=81, height=512, width=512), "tokens, more than the limit of 4096"),
    (dict(first_frame="/nonexistent/frame.png"), "first frame: file not found"),
    (dict(references=[b"not an image"]), "reference 1: cannot read image data as an image"),
    (dict(first_frame=np.zeros((8, 8, 3), np.float32)), "first frame: expected a uint8 image array"),
    (dict(first_frame_mask=np.zeros((16, 16), bool)), "first-frame mask is 16x16 but the first frame is 32x32"),
])
def test_bad_fields_are_refused_in_one_line(changes, words):
    with pytest.raises(RequestError) as error:
        _request(**changes)
    assert words in str(error.value)
    assert "\n" not in str(error.value)


def test_unreadable_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_text("hello")
    with pytest.raises(RequestError, match="cannot read .*broken.png as an image"):
        _request(first_frame=bad)


def test_references_at_their_own_size():
    request = _request(ref_size=(32, 48))
    assert request.ref_size == (32, 48) and request.reference_size == (32, 48)
    assert _request(ref_size=[48, 32]).ref_size == (48, 32)


DEFAULTS = {"num_frames": 9, "height": 64, "width": 64, "steps": 4, "guidance_scale": 5.0, "shift": 3.0}


def test_make_request_fills_the_model_defaults_and_only_them():
    rng = np.random.default_rng(3)
    request = make_request(DEFAULTS, LIMITS, first_frame=_image(rng), prompt="p", height=32, steps=None)
    assert (request.num_frames, request.height, request.width, request.steps) == (9, 32, 64, 4)
    assert request.seed == 0 and request.negative_prompt == "" and request.references == ()
    assert request.first_frame_mask is None and request.ref_size is None
    filled = {f.name for f in FIELDS if f.default is MODEL_DEFAULT}
    assert filled == set(DEFAULTS)  # every model-default field has a checkpoint default to come from


def test_make_request_refuses_unknown_fields_and_missing_required_ones():
    rng = np.random.default_rng(4)
    with pytest.raises(TypeError, match=r"unknown request field\(s\) \['colour'\]"):
        make_request(DEFAULTS, LIMITS, first_frame=_image(rng), prompt="p", colour="red")
    with pytest.raises(RequestError, match="first_frame is required"):
        make_request(DEFAULTS, LIMITS, prompt="p")


def test_the_validated_request_has_exactly_the_declared_fields():
    assert list(GenerationRequest.__dataclass_fields__) == [f.name for f in FIELDS]
    assert len({f.flag for f in FIELDS}) == len(FIELDS) and all(f.flag.startswith("--") for f in FIELDS)
    wires = [w.name for f in FIELDS for w in f.wire]
    assert len(set(wires)) == len(wires)
    for field in FIELDS:
        assert len(field.wire) == (2 if field.kind in contract.IMAGE_KINDS else 1), field.name


def _help(capsys, *command) -> str:
    from mvgen.cli import main

    with pytest.raises(SystemExit) as stop:
        main([*command, "--help"])
    assert stop.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


@pytest.mark.parametrize("command", [("generate",), ("client", "generate")])
def test_every_field_is_an_option_of_both_generate_commands(capsys, command):
    text = _help(capsys, *command)
    for field in FIELDS:
        assert f"{field.flag} " in text, field.flag
        assert " ".join(field.describe().split()) in text, field.name


def test_request_values_map_options_back_to_fields():
    from pathlib import Path

    from engine.cli_args import request_values
    from mvgen.cli import build_parser

    args = build_parser({}).parse_args(["generate", "--first-frame", "f.png", "--prompt", "p", "--frames", "5",
                                        "--reference", "a.png", "--reference", "b.png", "--ref-size", "32x48",
                                        "--out", "v.mp4"])
    values = request_values(args)
    assert values == {"prompt": "p", "first_frame": Path("f.png"), "references": [Path("a.png"), Path("b.png")],
                      "num_frames": 5, "ref_size": (32, 48)}


# a field the declaration does not have (tests/server/test_protocol.py follows it onto the wire)
MOTION = contract.RequestField(
    "motion_scale", "number", float, 1.0, contract.NumberAbove(0, False), "motion strength", "--motion-scale",
    (contract.Wire("motion_scale", "TYPE_FP32", (1,)),))


def test_a_new_field_becomes_an_option_with_no_other_edit(monkeypatch, capsys):
    monkeypatch.setattr(contract, "FIELDS", FIELDS + (MOTION,))
    for command in (("generate",), ("client", "generate")):
        text = _help(capsys, *command)
        assert "--motion-scale X" in text and "motion strength: a number > 0; default: 1.0" in text
