"""The embedded tiny checkpoint: complete diffusers layout, bit-identical builds, cached once."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from engine.adapters.lora import ORIGINAL_WAN_NAMES, AdapterNaming, read_adapter
from engine.backbones.wan.model import MultiViewWanTransformer
from engine.loading import denoiser_config
from engine.tiny import TINY_VERSION, build_tiny, default_cache_root, ensure_tiny, resolve_checkpoint


def _digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_builds_are_bit_identical(tiny_cache, tmp_path):
    first = tiny_cache / TINY_VERSION
    second = build_tiny(tmp_path / "again")
    digests = _digests(first)
    assert digests == _digests(second)
    assert any(name.endswith(".safetensors") for name in digests)


def test_diffusers_layout_with_sharded_transformer(tiny_cache):
    tiny = tiny_cache / TINY_VERSION
    index = json.loads((tiny / "model_index.json").read_text())
    components = ("transformer", "vae", "text_encoder", "tokenizer", "image_encoder", "image_processor", "scheduler")
    for component in components:
        assert component in index and (tiny / component).is_dir()
    shards = set(json.loads((tiny / "transformer/diffusion_pytorch_model.safetensors.index.json").read_text())
                 ["weight_map"].values())
    assert len(shards) > 1
    scheduler = json.loads((tiny / "scheduler/scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "flow_prediction" and scheduler["use_flow_sigmas"]


def test_bundled_adapter_is_a_peft_lora_on_every_block_linear(tiny_cache):
    with torch.device("meta"):  # the adapter read against the tiny model's own block linears
        model = MultiViewWanTransformer(denoiser_config(tiny_cache / TINY_VERSION))
    adapter = read_adapter(tiny_cache / TINY_VERSION / "adapter", AdapterNaming.of(model, ORIGINAL_WAN_NAMES))
    assert len(adapter.loras) == 2 * 10
    assert all(pair.down.shape[0] == 4 and pair.up.shape[1] == 4 for pair in adapter.loras.values())
    config = json.loads((tiny_cache / TINY_VERSION / "adapter" / "mvgen_config.json").read_text())
    assert config["lora_alpha"] == 4 and config["lora_rank"] == 4  # scale alpha / rank = 1


def test_ensure_tiny_builds_once(tiny_cache):
    marker = tiny_cache / TINY_VERSION / "model_index.json"
    stamp = marker.stat().st_mtime_ns
    assert ensure_tiny(tiny_cache) == tiny_cache / TINY_VERSION
    assert ensure_tiny(str(tiny_cache)) == tiny_cache / TINY_VERSION
    assert marker.stat().st_mtime_ns == stamp
    assert not [p for p in tiny_cache.iterdir() if p.name.startswith(".")]  # no staging dirs left behind


def test_the_cache_root_comes_from_the_mapping_it_is_given(tmp_path):
    assert default_cache_root({"MVGEN_CACHE": str(tmp_path)}) == tmp_path
    assert default_cache_root({}).parts[-2:] == (".cache", "mvgen")
    with pytest.raises(ValueError, match="tiny model needs a cache directory"):
        ensure_tiny(None)


def test_resolve_checkpoint(tiny_cache, tmp_path):
    tiny = tiny_cache / TINY_VERSION
    assert resolve_checkpoint("tiny", None, tiny_cache) == (tiny, tiny / "adapter")
    assert resolve_checkpoint("tiny", tmp_path / "a", tiny_cache) == (tiny, tmp_path / "a")
    assert resolve_checkpoint(str(tmp_path), None, None) == (tmp_path, None)
