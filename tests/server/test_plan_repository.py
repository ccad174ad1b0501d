"""The Triton repository around a TensorRT plan: mvgen_denoiser's config agrees with engine.denoiser_io."""
from __future__ import annotations

import json

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from engine import denoiser_io
from engine.backbones.registry import load_denoiser
from engine.tiny import TINY_VERSION
from server.plan_repository import write_repository


def _fake_plan(tmp_path, model, dtype="fp16", batch=(1, 2, 4)):
    """A plan file plus the metadata `mvgen export tensorrt` writes beside it (no TensorRT needed)."""
    plan = tmp_path / "den.plan"
    plan.write_bytes(b"not a real engine")
    profile = denoiser_io.Profile({"batch": batch})
    cfg = load_denoiser(model).config
    meta = {"dtype": dtype, "attention": "plugin", "profile": profile.to_dict(), "config": cfg.to_dict(),
            "source": {"model": str(model), "adapter": str(model / "adapter")}, "refittable": True}
    denoiser_io.plan_meta_path(plan).write_text(json.dumps(meta))
    return plan, cfg


def _config(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_denoiser_is_the_plan_with_shared_names(tiny_cache, tmp_path):
    plan, cfg = _fake_plan(tmp_path, tiny_cache / TINY_VERSION)
    repo = write_repository(plan, tmp_path / "repo")
    config = _config(repo / denoiser_io.DENOISER_MODEL_NAME / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 4
    assert (repo / denoiser_io.DENOISER_MODEL_NAME / "1" / "model.plan").read_bytes() == plan.read_bytes()
    specs = denoiser_io.config_specs(cfg)
    got = {t.name: (list(t.dims), model_config_pb2.DataType.Name(t.data_type)) for t in config.input}
    for spec in specs:
        dims, dtype = got.pop(spec.name)
        if spec.dims[1:]:
            assert dims == [d if isinstance(d, int) else -1 for d in spec.dims[1:]]
        assert dtype == ("TYPE_FP32" if spec.dtype == "float32" else "TYPE_FP16")
    assert not got
    (output,) = config.output
    assert output.name == denoiser_io.OUTPUT.name and list(output.dims) == [16, -1, -1, -1]
    assert {"mvgen", "mvgen_vae", "mvgen_text_encoder"} <= {p.name for p in repo.iterdir()}


def test_a_plan_exported_from_tiny_by_name_needs_the_cache_root(tiny_cache, tmp_path):
    plan, _ = _fake_plan(tmp_path, tiny_cache / TINY_VERSION)
    meta = json.loads(denoiser_io.plan_meta_path(plan).read_text())
    meta["source"] = {"model": "tiny", "adapter": None}
    denoiser_io.plan_meta_path(plan).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tiny model needs a cache directory"):
        write_repository(plan, tmp_path / "none")
    repo = write_repository(plan, tmp_path / "repo", cache_root=tiny_cache)
    assert str(tiny_cache / TINY_VERSION / "adapter") in (repo / "mvgen" / "config.pbtxt").read_text()


def test_the_command_writes_the_repository(tiny_cache, tmp_path, capsys):
    from mvgen.cli import main

    plan, _ = _fake_plan(tmp_path, tiny_cache / TINY_VERSION)
    assert main(["--cache-dir", str(tiny_cache), "repository", "--plan", str(plan), "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r")
    assert _config(tmp_path / "r" / denoiser_io.DENOISER_MODEL_NAME / "config.pbtxt").platform == "tensorrt_plan"
