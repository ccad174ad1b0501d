"""The generated model repository: every model folder, thin adapters, the denoiser's I/O from engine.denoiser_io."""
from __future__ import annotations

import ast

from engine.denoiser_io import OUTPUT, input_specs
from engine.tiny import resolve_checkpoint
from server.repository import MODEL_CLASSES, RepositoryOptions, build_repository


def _tiny(cache_root) -> dict:
    """The tiny checkpoint and its adapter as directories (the ``mvgen`` command resolves ``tiny`` the same way)."""
    model, adapter = resolve_checkpoint("tiny", None, cache_root)
    return dict(model=str(model), adapter=str(adapter))


def test_every_model_has_a_config_and_a_thin_adapter(tmp_path, tiny_cache):
    repo = build_repository(tmp_path / "repo", RepositoryOptions(**_tiny(tiny_cache)))
    for name, cls in MODEL_CLASSES.items():
        if name == "mvgen_denoiser_2":  # two-expert checkpoints only
            assert not (repo / name).exists()
            continue
        config = (repo / name / "config.pbtxt").read_text()
        assert f'name: "{name}"' in config and 'backend: "python"' in config
        source = (repo / name / "1" / "model.py").read_text()
        ast.parse(source)
        assert f"from server.models import {cls}" in source and len(source.splitlines()) < 40
    assert "decoupled: true" in (repo / "mvgen_stream" / "config.pbtxt").read_text()
    assert "decoupled" not in (repo / "mvgen" / "config.pbtxt").read_text()
    denoiser = (repo / "mvgen_denoiser" / "config.pbtxt").read_text()
    assert "dynamic_batching" in denoiser and "max_batch_size: 8" in denoiser
    assert 'key: "pad_batch_to" value: { string_value: "0" }' in denoiser  # batches at their real size
    for spec in [*input_specs(32, 32), OUTPUT]:
        assert f'name: "{spec.name}"' in denoiser


def test_a_tensorrt_plan_replaces_the_python_denoiser(tmp_path, tiny_cache):
    plan = tmp_path / "denoiser.plan"
    plan.write_bytes(b"plan bytes")
    repo = build_repository(tmp_path / "repo", RepositoryOptions(**_tiny(tiny_cache), dtype="float16",
                                                                 denoiser_plan=str(plan)))
    config = (repo / "mvgen_denoiser" / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in config and "backend:" not in config
    assert (repo / "mvgen_denoiser" / "1" / "model.plan").read_bytes() == b"plan bytes"
    assert not (repo / "mvgen_denoiser" / "1" / "model.py").exists()
    assert 'name: "latents" data_type: TYPE_FP16' in config
    assert 'name: "timestep" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [  ] }' in config
    # the scheduler loop is untouched: the same mvgen config
    assert (repo / "mvgen" / "1" / "model.py").exists()


def test_each_family_gets_its_models_and_a_rebuild_drops_the_others(tmp_path, tiny_cache):
    """Wan2.2: a denoiser per expert and no CLIP; T2V: no CLIP; a repository rebuilt for another checkpoint keeps no
    stale model (tritonserver would load it)."""
    repo = tmp_path / "repo"
    build_repository(repo, RepositoryOptions(model="tiny-wan22", cache_root=str(tiny_cache)))
    second = (repo / "mvgen_denoiser_2" / "config.pbtxt").read_text()
    assert 'key: "expert" value: { string_value: "1" }' in second and 'name: "image_context"' not in second
    assert 'name: "condition"' in second and not (repo / "mvgen_image_encoder").exists()
    assert 'tiny-wan22-v2/adapter_2' in (repo / "mvgen" / "config.pbtxt").read_text()  # the bundled one, absolute
    build_repository(repo, RepositoryOptions(model="tiny-t2v", cache_root=str(tiny_cache)))
    denoiser = (repo / "mvgen_denoiser" / "config.pbtxt").read_text()
    assert 'name: "condition"' not in denoiser and not (repo / "mvgen_denoiser_2").exists()
    build_repository(repo, RepositoryOptions(**_tiny(tiny_cache)))
    assert (repo / "mvgen_image_encoder" / "config.pbtxt").is_file()


def test_memory_options_reach_the_served_models(tmp_path, tiny_cache):
    """``offload``, ``vae_tiling`` and the resolved ``dtype`` are config.pbtxt parameters of every model; each
    model's ``load_checkpoint`` reads them back (described for CUDA: nothing here needs a GPU)."""
    import json
    import re

    import torch

    from engine.checkpoint import VaeTiling
    from server.models import load_checkpoint

    tiling = dict(tile_height=128, tile_width=128, stride_height=96, stride_width=96)
    repo = build_repository(tmp_path / "repo", RepositoryOptions(**_tiny(tiny_cache), dtype="auto", device="cuda",
                                                                 offload="block", vae_tiling=tiling))
    for name in ("mvgen", "mvgen_vae", "mvgen_denoiser"):
        text = (repo / name / "config.pbtxt").read_text()
        params = {k: json.loads(v) for k, v in
                  re.findall(r'parameters \{ key: "(\w+)" value: \{ string_value: ("(?:[^"\\]|\\.)*") \} \}', text)}
        assert params["dtype"] == "bfloat16" and params["offload"] == "block"  # auto on CUDA
        checkpoint = load_checkpoint({"parameters": {k: {"string_value": v} for k, v in params.items()}})
        assert (checkpoint.offload, checkpoint.vae_tiling, checkpoint.dtype) == ("block", VaeTiling(**tiling),
                                                                                 torch.bfloat16)
    assert 'name: "latents" data_type: TYPE_BF16' in (repo / "mvgen_denoiser" / "config.pbtxt").read_text()

