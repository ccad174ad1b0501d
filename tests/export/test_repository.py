"""The Triton repository around a TensorRT plan: mvgen_denoiser's config agrees with export.names."""
from __future__ import annotations

import json

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from engine.loading import load_denoiser
from export import names
from export.repository import write_repository
from export.tensorrt_build import plan_meta_path


def _fake_plan(tmp_path, checkpoint, dtype="fp16", batch=(1, 2, 4)):
    """A plan file plus the metadata `mvgen export tensorrt` writes beside it (no TensorRT needed)."""
    root, adapter, _ = checkpoint
    plan = tmp_path / "den.plan"
    plan.write_bytes(b"not a real engine")
    profile = names.Profile({"batch": batch})
    cfg = load_denoiser(root).config
    meta = {"dtype": dtype, "attention": "plugin", "profile": profile.to_dict(), "config": cfg.to_dict(),
            "source": {"model": str(root), "adapter": str(adapter)}, "refittable": True}
    plan_meta_path(plan).write_text(json.dumps(meta))
    return plan, cfg


def test_denoiser_is_the_plan_with_shared_names(checkpoint, tmp_path):
    plan, cfg = _fake_plan(tmp_path, checkpoint)
    repo = write_repository(plan, tmp_path / "repo")
    config = text_format.Parse((repo / names.DENOISER_MODEL_NAME / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 4
    assert (repo / names.DENOISER_MODEL_NAME / "1" / "model.plan").read_bytes() == plan.read_bytes()
    specs = names.input_specs(cfg.text_dim, cfg.image_dim, cfg.text_len)
    got = {t.name: (list(t.dims), model_config_pb2.DataType.Name(t.data_type)) for t in config.input}
    for spec in specs:
        dims, dtype = got.pop(spec.name)
        if spec.dims[1:]:
            assert dims == [d if isinstance(d, int) else -1 for d in spec.dims[1:]]
        assert dtype == ("TYPE_FP32" if spec.dtype == "float32" else "TYPE_FP16")
    assert not got
    (output,) = config.output
    assert output.name == names.OUTPUT.name and list(output.dims) == [16, -1, -1, -1]
    assert {"mvgen", "mvgen_vae", "mvgen_text_encoder"} <= {p.name for p in repo.iterdir()}
