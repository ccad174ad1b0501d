"""Shared fixtures: a small Wan2.1-I2V checkpoint, a PEFT-made reference adapter, exported graphs.

The oracle of every exported graph is the *unmerged* model: our denoiser with PEFT LoRA layers injected
into the reference stream (as in tests/engine/test_lora.py); the graph is exported from ``load_denoiser``
with the same LoRA written to a PEFT adapter directory and merged at load.
"""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import save_file

from engine.backbones.registry import load_denoiser
from export.onnx_export import export_denoiser
from tests.engine.conftest import make_wan
from tests.engine.test_ti2v import TI2V

def run_cli(argv):
    """The handler of ``mvgen ARGV`` called in this process (the root parser supplies ``--cache-dir``), so a usage
    error arrives as the exception and a refusal as the exit code."""
    from mvgen.cli import build_parser

    args = build_parser({}).parse_args(argv)
    return args.func(args)


RANK, ALPHA = 4, 8.0
TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.add_v_proj",
           "ffn.net.0.proj", "ffn.net.2"]
VIEW_WEIGHTS = [0.5, 1.0, 2.0]  # MVAnimate omegas: non-trivial per-view logit scales reach the graph


def _inject(den, targets=TARGETS):
    pattern = r"ref_blocks\.\d+\.(" + "|".join(t.replace(".", r"\.") for t in targets) + ")"
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=pattern), den)
    return den


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """(pipeline dir, adapter dir, lora state dict): sharded base weights + a PEFT adapter directory."""
    root = tmp_path_factory.mktemp("export_wan")
    make_wan(seed=3).save_pretrained(root / "transformer", safe_serialization=True, max_shard_size="40KB")
    den = _inject(load_denoiser(root))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in den.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    lora = {k: v.contiguous() for k, v in get_peft_model_state_dict(den).items()}
    adapter = root / "adapter"
    _write_adapter(lora, adapter)
    return root, adapter, lora


def _write_adapter(lora: dict, adapter) -> None:
    """A PEFT adapter directory: a reference-stream LoRA (its PEFT state ``lora``) and ``VIEW_WEIGHTS``."""
    adapter.mkdir()
    tensors = {f"transformer.{k[len('ref_'):]}": v for k, v in lora.items()}
    tensors["view_logit_scales"] = torch.tensor(VIEW_WEIGHTS)
    save_file(tensors, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA}))


def unmerged_model(checkpoint, **overrides):
    """The oracle: base weights, PEFT LoRA layers (unmerged) in the reference stream, the adapter's omegas."""
    root, _, lora = checkpoint
    den = _inject(load_denoiser(root, attention_backend="reference", **overrides))
    set_peft_model_state_dict(den, lora)
    den.view_logit_scales.copy_(torch.tensor(VIEW_WEIGHTS))
    return den.eval()


@pytest.fixture(scope="session")
def exported(checkpoint, tmp_path_factory):
    """``exported(attention, mask)`` -> (onnx path, unmerged oracle); each graph is exported once."""
    root, adapter, _ = checkpoint
    cache = {}

    def get(attention: str, mask: str):
        if (attention, mask) not in cache:
            den = load_denoiser(root, adapter=adapter, attention_backend="reference", ref_attention=mask)
            out = tmp_path_factory.mktemp(f"onnx_{attention}_{mask}")
            cache[attention, mask] = (export_denoiser(den, out, attention=attention, optimize=False),
                                      unmerged_model(checkpoint, ref_attention=mask))
        return cache[attention, mask]

    return get


# Wan2.2-TI2V-5B (tests.engine.test_ti2v.TI2V) has no CLIP, so no image K/V projections to adapt
TI2V_TARGETS = [t for t in TARGETS if not t.startswith("attn2.add_")]


@pytest.fixture(scope="session")
def ti2v_exported(tmp_path_factory):
    """(onnx path, unmerged oracle, diffusers base): a TI2V denoiser with a PEFT reference adapter merged at load,
    exported with native attention; the oracle is the same base with the LoRA unmerged (PEFT layers) and the
    adapter's omegas; the base (``WanTransformer3DModel``) is what the graph equals without references."""
    root = tmp_path_factory.mktemp("export_ti2v")
    base = make_wan(seed=8, **TI2V)
    base.save_pretrained(root / "transformer", safe_serialization=True)
    oracle = _inject(load_denoiser(root, attention_backend="reference"), TI2V_TARGETS)
    gen = torch.Generator().manual_seed(9)
    lora = {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in get_peft_model_state_dict(oracle).items()}
    set_peft_model_state_dict(oracle, lora)
    oracle.view_logit_scales.copy_(torch.tensor(VIEW_WEIGHTS))
    _write_adapter(lora, root / "adapter")
    merged = load_denoiser(root, adapter=root / "adapter", attention_backend="reference")
    assert merged.config.task == "ti2v"
    return export_denoiser(merged, root / "onnx", optimize=False), oracle.eval(), base
