"""`mvgen export onnx` end to end (export + polygraphy verification) and its one-line refusals."""
from __future__ import annotations

import pytest

from engine import denoiser_io
from engine.cli_args import UsageError
from mvgen.cli import build_parser


def _run(argv):
    """The handler of ``mvgen ARGV`` called directly, so a usage error arrives as the exception."""
    args = build_parser({}).parse_args(argv)
    return args.func(args)


def test_export_onnx_with_verification(checkpoint, tmp_path, capsys):
    root, adapter, _ = checkpoint
    out = tmp_path / "onnx"
    code = _run(["export", "onnx", "--model", str(root), "--adapter", str(adapter), "--out", str(out),
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
        _run(["export", "onnx", "--model", str(checkpoint[0]), "--out", str(tmp_path / "o"), *extra])


@pytest.mark.parametrize("model, expert", [("tiny-t2v", "1"), ("tiny-wan22", "2")])
def test_other_wan_families_export_and_verify(tiny_cache, tmp_path, capsys, model, expert):
    """T2V's graph has no condition input, Wan2.2's none for CLIP; the low-noise expert exports on its own."""
    out = tmp_path / "onnx"
    code = _run(["--cache-dir", str(tiny_cache), "export", "onnx", "--model", model, "--expert", expert,
                 "--out", str(out), "--verify"])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0, printed
    assert len([line for line in printed if line.startswith("verify ok")]) == 3
    from export.onnx_export import read_meta

    meta = read_meta(out)
    names = [spec["name"] for spec in meta["inputs"]]
    assert "image_context" not in names and ("condition" in names) == (model == "tiny-wan22")
    assert meta["source"]["expert"] == int(expert) - 1
