"""`mvgen export onnx` end to end (export + polygraphy verification) and its one-line refusals."""
from __future__ import annotations

import pytest

from engine import denoiser_io
from engine.errors import UsageError
from tests.export.conftest import run_cli

pytestmark = pytest.mark.slow  # exports every family and mode through the command line


def test_export_onnx_with_verification(checkpoint, tmp_path, capsys):
    root, adapter, _ = checkpoint
    out = tmp_path / "onnx"
    code = run_cli(["export", "onnx", "--model", str(root), "--adapter", str(adapter), "--out", str(out),
                 "--attention", "plugin", "--set", "ref_attention=isolated", "--profile", "batch=1:2:4",
                 "--verify"])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0, printed
    assert printed[0] == str(out / denoiser_io.ONNX_FILE)
    assert len([line for line in printed if line.startswith("verify ok")]) == 3
    from export.onnx_export import read_meta
    meta = read_meta(out)
    assert meta["attention"] == "plugin" and meta["profile"]["batch"] == [1, 2, 4]
    assert meta["config"]["ref_attention"] == "isolated" and meta["source"]["adapter"] == str(adapter)


@pytest.mark.parametrize("extra,message", [
    (["--profile", "batch=3:2:1"], "min <= opt <= max"),
    (["--set", "ref_attention"], "KEY=VALUE"),
    (["--set", "view_attention=sideways"], "view_attention"),
])
def test_bad_export_arguments_are_usage_errors(checkpoint, tmp_path, extra, message):
    with pytest.raises(UsageError, match=message):
        run_cli(["export", "onnx", "--model", str(checkpoint[0]), "--out", str(tmp_path / "o"), *extra])


# (model, expert, adapter flag, the embedded adapter): each family's graph carries one seed method, so three
# exports cover T2V (no condition), Wan2.2's low-noise expert (no CLIP) and every mode's inputs
FAMILY_MODES = {
    "t2v+multiview": ("tiny-t2v", "1", "--adapter", "adapter_multiview"),
    "wan22-expert2+prototype": ("tiny-wan22", "2", "--adapter-2", "adapter_prototype"),
    "i2v+identity": ("tiny", "1", "--adapter", "adapter_identity"),
}


@pytest.mark.parametrize("case", list(FAMILY_MODES))
def test_families_and_seed_modes_export_and_verify(tiny_cache, tmp_path, capsys, case):
    """The graph's inputs follow the family and the mode; polygraphy compares onnxruntime with PyTorch (< 1e-4)
    at every verification shape the graph takes (the modes' reference paths: R >= 1)."""
    from engine.tiny import VARIANTS

    model, expert, flag, adapter = FAMILY_MODES[case]
    out = tmp_path / "onnx"
    code = run_cli(["--cache-dir", str(tiny_cache), "export", "onnx", "--model", model, "--expert", expert, flag,
                 str(tiny_cache / VARIANTS[model].directory / adapter), "--out", str(out), "--verify"])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0, printed
    verified = [line for line in printed if line.startswith("verify ")]
    assert verified and all(line.startswith("verify ok") for line in verified), printed
    from export.onnx_export import read_meta

    meta = read_meta(out)
    names = {spec["name"] for spec in meta["inputs"]}
    assert ("condition" in names) == (model != "tiny-t2v") and ("image_context" in names) == (model == "tiny")
    assert meta["source"]["expert"] == int(expert) - 1
    mode_inputs = {"t2v+multiview": {"view_omega"}, "wan22-expert2+prototype": {"frame_pose", "ref_pose"},
                   "i2v+identity": {"identity_context"}}[case]
    assert names & {"view_omega", "frame_pose", "ref_pose", "identity_context"} == mode_inputs


def test_wan22_t2v_expert_with_stand_in_exports_and_verifies(tiny_cache, tmp_path, capsys):
    """Wan2.2-T2V-A14B's low-noise expert with Stand-In's pair (``--adapter`` high, ``--adapter-2`` low; the experts
    must agree on the reference settings): a T2V expert's graph (no condition, no CLIP) carrying Stand-In's positions
    (``past_grid``) and its references skipping the cross-attention; polygraphy compares onnxruntime with PyTorch at
    every verification shape."""
    from engine.tiny import TRANSFORMER_CONFIG, VARIANTS, write_stand_in_adapter
    from export.onnx_export import read_meta

    config = {**TRANSFORMER_CONFIG, **VARIANTS["tiny-wan22-t2v"].transformer}
    high, low = (write_stand_in_adapter(tmp_path / name, config, seed) for name, seed in (("high", 31), ("low", 32)))
    out = tmp_path / "onnx"
    code = run_cli(["--cache-dir", str(tiny_cache), "export", "onnx", "--model", "tiny-wan22-t2v", "--expert", "2",
                 "--adapter", str(high), "--adapter-2", str(low), "--out", str(out), "--verify"])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0, printed
    verified = [line for line in printed if line.startswith("verify ")]
    assert len(verified) == 3 and all(line.startswith("verify ok") for line in verified), printed
    meta = read_meta(out)
    assert meta["source"]["expert"] == 1 and meta["source"]["sources"]["adapter_2"] == str(low)
    assert meta["config"]["ref_rope"] == "past_grid" and meta["config"]["ref_cross_attention"] is False
    assert {spec["name"] for spec in meta["inputs"]} == {"latents", "timestep", "text", "ref_latents"}
