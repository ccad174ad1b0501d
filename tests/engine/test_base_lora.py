"""Base-model LoRAs: diffusers' own loader (load_lora_weights + fuse_lora) is the oracle for every spelling.

The LoRA files are written here key by key in each spelling (that is the test data); the model is a small random
diffusers WanTransformer3DModel, I2V-like and T2V-like.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import WanPipeline
from safetensors.torch import save_file

from engine.adapters.base_lora import LoraSpec, merge_base_loras
from engine.errors import AdapterError, LoraError

from .conftest import make_wan

MODELS = {"i2v": {}, "t2v": dict(in_channels=16, image_dim=None, added_kv_proj_dim=None)}
# original Wan module names -> diffusers', inside a block and outside
WAN_BLOCK = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
WAN_OTHER = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
}
IMAGE_ONLY = ("cross_attn.k_img", "cross_attn.v_img", "img_emb.proj.1")
LAYERS = 2


class Writer:
    """Random LoRA tensors shaped for one model, drawn from a seeded generator."""

    def __init__(self, model, seed):
        self.state = model.state_dict()
        self.i2v = model.config.image_dim is not None
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.gen) * 0.2

    def pair(self, diffusers_name, rank):
        out_features, in_features = self.state[diffusers_name + ".weight"].shape
        return self.randn(rank, in_features), self.randn(out_features, rank)

    def bias(self, diffusers_name):
        return self.randn(*self.state[diffusers_name + ".bias"].shape)

    def wan_modules(self, names):
        return [n for n in names if self.i2v or n not in IMAGE_ONLY]


# add_k_proj with add_v_proj: diffusers' T2V->I2V expansion overwrites an add_k_proj LoRA that comes alone with zeros
DIFFUSERS_MODULES = ["attn1.to_q", "attn1.to_out.0", "attn2.to_k", "attn2.add_k_proj", "attn2.add_v_proj",
                     "ffn.net.0.proj", "ffn.net.2"]
RANK_2 = ("attn2.to_k", "proj_out")  # ranks differ per module, as in real files


def diffusers_tensors(w: Writer, prefix="transformer."):
    modules = [f"blocks.{i}.{m}" for i in range(LAYERS) for m in DIFFUSERS_MODULES if w.i2v or "add_" not in m]
    tensors = {}
    for module in modules + ["condition_embedder.time_proj", "proj_out"]:
        down, up = w.pair(module, 2 if module.endswith(RANK_2) else 4)
        tensors[f"{prefix}{module}.lora_A.weight"], tensors[f"{prefix}{module}.lora_B.weight"] = down, up
    return tensors


def adapter_config(tensors):
    """A PEFT LoRA config as diffusers would save it: alpha != r, with rank and alpha patterns."""
    targets = sorted({k.removeprefix("transformer.").split(".lora_")[0] for k in tensors})
    return {"r": 4, "lora_alpha": 6.0, "target_modules": targets,
            "rank_pattern": {f"^blocks.{i}.attn2.to_k": 2 for i in range(LAYERS)} | {"^proj_out": 2},
            "alpha_pattern": {"ffn.net.2": 10.0, "^proj_out": 3.0}}


def write_diffusers(w, folder):
    save_file(diffusers_tensors(w), folder / "lora.safetensors")
    return folder / "lora.safetensors"


def write_diffusers_metadata(w, folder):
    tensors = diffusers_tensors(w)
    metadata = {f"transformer.{k}": v for k, v in adapter_config(tensors).items()}
    save_file(tensors, folder / "lora.safetensors", metadata={"lora_adapter_metadata": json.dumps(metadata)})
    return folder / "lora.safetensors"


def write_musubi(w, folder):
    # musubi-tuner / kohya: every linear of every block, each with its alpha (diffusers' converter requires both)
    tensors = {}
    for i in range(LAYERS):
        for j, wan in enumerate(w.wan_modules(WAN_BLOCK)):
            stem = f"lora_unet_blocks_{i}_{wan.replace('.', '_')}"
            down, up = w.pair(f"blocks.{i}.{WAN_BLOCK[wan]}", 4)
            tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                        f"{stem}.alpha": torch.tensor(float(1 + j % 5))}
    save_file(tensors, folder / "musubi.safetensors")
    return folder / "musubi.safetensors"


def _wan_pairs(w, blocks, others, down_key, up_key, alpha=None):
    tensors = {}
    names = [(f"blocks.{i}.{wan}", f"blocks.{i}.{WAN_BLOCK[wan]}") for i in range(LAYERS) for wan in blocks]
    for j, (wan, ours) in enumerate(names + [(wan, WAN_OTHER[wan]) for wan in others]):
        down, up = w.pair(ours, 2 if j % 3 == 0 else 4)
        tensors |= {f"diffusion_model.{wan}.{down_key}.weight": down, f"diffusion_model.{wan}.{up_key}.weight": up}
        if alpha is not None and wan.startswith("blocks."):  # diffusers reads alphas of block linears only
            tensors[f"diffusion_model.{wan}.alpha"] = torch.tensor(alpha + j)
    return tensors


def write_wan_original(w, folder):
    blocks = w.wan_modules(["self_attn.q", "self_attn.o", "cross_attn.k", "cross_attn.v", "cross_attn.k_img",
                            "cross_attn.v_img", "ffn.0", "ffn.2"])
    tensors = _wan_pairs(w, blocks, ["text_embedding.0", "time_projection.1", "head.head"], "lora_A", "lora_B")
    save_file(tensors, folder / "wan.safetensors")
    return folder / "wan.safetensors"


def write_comfyui(w, folder):
    blocks = w.wan_modules(["self_attn.k", "self_attn.v", "cross_attn.q", "cross_attn.o", "cross_attn.k_img",
                            "cross_attn.v_img", "ffn.0", "ffn.2"])
    tensors = _wan_pairs(w, blocks, w.wan_modules(["img_emb.proj.1", "text_embedding.2"]), "lora_down", "lora_up",
                         alpha=1.5)
    save_file(tensors, folder / "comfy.safetensors")
    return folder / "comfy.safetensors"


def lightx2v_tensors(w):
    """ComfyUI pairs with alphas plus LightX2V's full deltas: bias deltas (diff_b) on the LoRA'd linears, the
    output head as a full weight delta (head.head.diff), and zeroed norm deltas (diffusers drops those)."""
    blocks = w.wan_modules(["self_attn.q", "self_attn.o", "cross_attn.k", "cross_attn.v_img", "cross_attn.k_img",
                            "ffn.0", "ffn.2"])
    others = w.wan_modules(["time_embedding.0", "time_projection.1", "text_embedding.2", "img_emb.proj.1"])
    tensors = _wan_pairs(w, blocks, others, "lora_down", "lora_up", alpha=3.0)
    for wan, ours in [(f"blocks.{i}.{b}", f"blocks.{i}.{WAN_BLOCK[b]}") for i in range(LAYERS) for b in blocks] + \
            [(wan, WAN_OTHER[wan]) for wan in others]:
        tensors[f"diffusion_model.{wan}.diff_b"] = w.bias(ours)
    head = w.state["proj_out.weight"]
    tensors["diffusion_model.head.head.diff"] = w.randn(*head.shape)
    tensors["diffusion_model.head.head.diff_b"] = w.bias("proj_out")
    for i in range(LAYERS):
        tensors[f"diffusion_model.blocks.{i}.norm3.diff"] = torch.zeros(head.shape[1])
        tensors[f"diffusion_model.blocks.{i}.norm3.diff_b"] = torch.zeros(head.shape[1])
    return tensors


def write_lightx2v(w, folder):
    save_file(lightx2v_tensors(w), folder / "lightx2v.safetensors")
    return folder / "lightx2v.safetensors"


WRITERS = {
    "diffusers": write_diffusers, "diffusers_metadata": write_diffusers_metadata, "musubi": write_musubi,
    "wan_original": write_wan_original, "comfyui": write_comfyui, "lightx2v": write_lightx2v,
}


def diffusers_merged(model, loras: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    """The oracle: diffusers loads each LoRA as a PEFT adapter, weights them, fuses and unloads."""
    pipe = WanPipeline(transformer=model, vae=None, text_encoder=None, tokenizer=None, scheduler=None)
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, [scale for _, scale in loras])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
    return model.state_dict()


def assert_same_state(ours, oracle, base):
    assert ours.keys() == oracle.keys()
    changed = [k for k in base if not torch.equal(oracle[k], base[k])]
    assert changed, "the oracle changed nothing: the test LoRA is empty"
    for key in ours:
        torch.testing.assert_close(ours[key], oracle[key], rtol=1e-5, atol=1e-6, msg=key)


def fresh_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("spelling", sorted(WRITERS))
def test_merge_equals_diffusers_fuse(tmp_path, spelling, kind):
    model = make_wan(seed=3, **MODELS[kind])
    path = WRITERS[spelling](Writer(model, seed=11), tmp_path)
    state, base = fresh_state(model), fresh_state(model)
    merge_base_loras(state, [LoraSpec(path, 0.7)])
    assert_same_state(state, diffusers_merged(model, [(path, 0.7)]), base)


def test_peft_folder_with_adapter_config_equals_diffusers_metadata(tmp_path):
    # PEFT's save_pretrained layout: "base_model.model." keys, alpha in adapter_config.json; diffusers reads the
    # same adapter config from the file's lora_adapter_metadata
    model = make_wan(seed=4)
    tensors = diffusers_tensors(Writer(model, seed=12), prefix="base_model.model.")
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **adapter_config(tensors)}))
    oracle_file = write_diffusers_metadata(Writer(model, seed=12), tmp_path)
    state, base = fresh_state(model), fresh_state(model)
    merge_base_loras(state, [LoraSpec(folder, -0.5)])
    assert_same_state(state, diffusers_merged(model, [(oracle_file, -0.5)]), base)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # PEFT on a second adapter: expected here
def test_two_loras_stack_in_order(tmp_path):
    model = make_wan(seed=5)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    first = write_lightx2v(Writer(model, seed=13), tmp_path / "a")
    second = write_musubi(Writer(model, seed=14), tmp_path / "b")
    state, base = fresh_state(model), fresh_state(model)
    merge_base_loras(state, [LoraSpec(first, 1.0), LoraSpec(second, 0.4)])
    assert_same_state(state, diffusers_merged(model, [(first, 1.0), (second, 0.4)]), base)


def test_prefix_merges_block_targets_into_the_prefixed_copy_only(tmp_path):
    model = make_wan(seed=6)
    path = write_lightx2v(Writer(model, seed=15), tmp_path)
    base = fresh_state(model)
    state = base | {f"ref_{k}": v.clone() for k, v in base.items() if k.startswith("blocks.")}
    merge_base_loras(state, [LoraSpec(path, 0.9)], prefix="ref_")
    oracle = diffusers_merged(model, [(path, 0.9)])
    for key in base:  # the unprefixed model, non-block targets (proj_out, time_proj, ...) included, is untouched
        assert torch.equal(state[key], base[key]), key
    for key in (k for k in base if k.startswith("blocks.")):
        torch.testing.assert_close(state["ref_" + key], oracle[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(oracle["proj_out.weight"], base["proj_out.weight"])  # so the LoRA had non-block targets


def test_bfloat16_weights_stay_bfloat16(tmp_path):
    model = make_wan(seed=7)
    path = write_comfyui(Writer(model, seed=16), tmp_path)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    merge_base_loras(state, [LoraSpec(path)])
    oracle = diffusers_merged(model, [(path, 1.0)])
    for key, value in state.items():
        assert value.dtype == torch.bfloat16
        torch.testing.assert_close(value.float(), oracle[key], rtol=2e-2, atol=2e-2, msg=key)


def merge_error(tmp_path, tensors, model=None, **save) -> str:
    """The one-line error merging ``tensors`` (written as a file) gives, checking the state was left alone."""
    save_file(tensors, tmp_path / "bad.safetensors", **save)
    model = model or make_wan(seed=8)
    state, base = fresh_state(model), fresh_state(model)
    with pytest.raises(LoraError) as caught:
        merge_base_loras(state, [LoraSpec(tmp_path / "bad.safetensors")])
    assert all(torch.equal(state[k], base[k]) for k in base), "a refused LoRA changed the state"
    assert isinstance(caught.value, AdapterError) and "\n" not in str(caught.value)
    return str(caught.value)


@pytest.mark.parametrize("dropped", ["diffusion_model.blocks.0.diff_m", "diffusion_model.blocks.1.norm3.diff",
                                     "diffusion_model.patch_embedding.diff_b", "diffusion_model.blocks.0.ffn.0.diff"])
def test_tensor_diffusers_drops_silently_is_an_error(tmp_path, dropped):
    tensors = lightx2v_tensors(Writer(make_wan(seed=9), seed=17))
    save_file(tensors, tmp_path / "without.safetensors")
    tensors[dropped] = torch.ones(48)  # non-zero: dropping it leaves the LoRA half-applied
    save_file(tensors, tmp_path / "with.safetensors")
    # diffusers loads both files without an error, to the same weights: the delta is lost
    without = diffusers_merged(make_wan(seed=9), [(tmp_path / "without.safetensors", 1.0)])
    with_it = diffusers_merged(make_wan(seed=9), [(tmp_path / "with.safetensors", 1.0)])
    assert all(torch.equal(without[k], with_it[k]) for k in without)
    message = merge_error(tmp_path, tensors, make_wan(seed=9))
    assert dropped in message and "(1 key)" in message


def test_unknown_keys_are_named_with_their_count(tmp_path):
    w = Writer(make_wan(seed=8), seed=18)
    tensors = diffusers_tensors(w)
    for i in range(8):
        tensors[f"transformer.blocks.0.attn1.to_x{i}.lora_A.weight"] = w.randn(4, 48)
        tensors[f"transformer.blocks.0.attn1.to_x{i}.lora_B.weight"] = w.randn(48, 4)
    message = merge_error(tmp_path, tensors)
    assert "transformer.blocks.0.attn1.to_x0.lora_A.weight" in message and "(16 keys)" in message


def test_image_lora_on_a_text_model_names_the_image_keys(tmp_path):
    i2v, t2v = make_wan(seed=8), make_wan(seed=8, **MODELS["t2v"])
    message = merge_error(tmp_path, _wan_pairs(Writer(i2v, seed=19), ["cross_attn.k_img", "cross_attn.v_img", "ffn.0"],
                                               [], "lora_down", "lora_up", alpha=2.0), model=t2v)
    assert "diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight" in message and "add_k_proj" in message


@pytest.mark.parametrize("extra", ["text_encoder.encoder.block.0.q.lora_A.weight",
                                   "transformer.blocks.0.attn1.to_q.dora_scale"])
def test_keys_diffusers_ignores_are_an_error(tmp_path, extra):
    # diffusers' loader skips keys outside "transformer." without a word and filters DoRA scales with a warning
    w = Writer(make_wan(seed=8), seed=20)
    assert extra in merge_error(tmp_path, diffusers_tensors(w) | {extra: w.randn(1, 48)})


def test_time_projection_bias_without_its_weights_is_an_error(tmp_path):
    # diffusers' converter drops time_projection keys when the file has no time_projection weights (AccVideo)
    w = Writer(make_wan(seed=8), seed=27)
    tensors = _wan_pairs(w, ["self_attn.q"], [], "lora_A", "lora_B")
    tensors["diffusion_model.time_projection.1.diff_b"] = w.bias("condition_embedder.time_proj")
    assert "diffusion_model.time_projection.1.diff_b" in merge_error(tmp_path, tensors)


def test_add_k_proj_lora_alone_is_merged(tmp_path):
    # diffusers overwrites an add_k_proj LoRA that comes without add_v_proj with zeros (its T2V->I2V expansion);
    # the oracle is the same file plus an add_v_proj LoRA whose B is zero, which diffusers merges whole
    model = make_wan(seed=10)
    w = Writer(model, seed=28)
    tensors = {f"transformer.blocks.0.attn2.{m}.lora_{ab}.weight": t for m in ("to_k", "add_k_proj")
               for ab, t in zip("AB", w.pair(f"blocks.0.attn2.{m}", 4))}
    save_file(tensors, tmp_path / "add_k.safetensors")
    zero_v = {"transformer.blocks.0.attn2.add_v_proj.lora_A.weight": w.randn(4, 48),
              "transformer.blocks.0.attn2.add_v_proj.lora_B.weight": torch.zeros(48, 4)}
    save_file(tensors | zero_v, tmp_path / "oracle.safetensors")
    state, base = fresh_state(model), fresh_state(model)
    merge_base_loras(state, [LoraSpec(tmp_path / "add_k.safetensors")])
    assert_same_state(state, diffusers_merged(model, [(tmp_path / "oracle.safetensors", 1.0)]), base)
    assert not torch.equal(state["blocks.0.attn2.add_k_proj.weight"], base["blocks.0.attn2.add_k_proj.weight"])


@pytest.mark.parametrize("spelling", ["diffusers", "wan_original"])
def test_half_a_pair_is_an_error(tmp_path, spelling):
    w = Writer(make_wan(seed=8), seed=21)
    if spelling == "diffusers":
        tensors = diffusers_tensors(w)
        missing = "transformer.blocks.1.ffn.net.2.lora_B.weight"
    else:
        tensors = _wan_pairs(w, ["self_attn.q", "ffn.2"], [], "lora_A", "lora_B")
        missing = "diffusion_model.blocks.1.ffn.2.lora_B.weight"
    del tensors[missing]
    assert "blocks.1.ffn.net.2" in merge_error(tmp_path, tensors)


def test_half_a_pair_with_alpha_is_an_error(tmp_path):
    # with an alpha diffusers' converter indexes both halves: its KeyError becomes a one-line error
    tensors = _wan_pairs(Writer(make_wan(seed=8), seed=22), ["self_attn.q"], [], "lora_down", "lora_up", alpha=2.0)
    del tensors["diffusion_model.blocks.0.self_attn.q.lora_up.weight"]
    assert "blocks.0.self_attn.q.lora_up.weight" in merge_error(tmp_path, tensors)


def test_shape_mismatch_names_the_module(tmp_path):
    w = Writer(make_wan(seed=8), seed=23)
    tensors = diffusers_tensors(w)
    tensors["transformer.blocks.0.ffn.net.0.proj.lora_A.weight"] = w.randn(4, 40)
    message = merge_error(tmp_path, tensors)
    assert "blocks.0.ffn.net.0.proj" in message and "[4, 40]" in message and "[64, 48]" in message


def test_bias_delta_shape_mismatch_names_the_module(tmp_path):
    w = Writer(make_wan(seed=8), seed=24)
    tensors = lightx2v_tensors(w)
    tensors["diffusion_model.blocks.0.ffn.0.diff_b"] = w.randn(7)
    assert "blocks.0.ffn.net.0.proj" in merge_error(tmp_path, tensors)


def test_rank_disagreeing_with_the_adapter_config_is_an_error(tmp_path):
    w = Writer(make_wan(seed=8), seed=25)
    tensors = diffusers_tensors(w)
    metadata = {"transformer.r": 8, "transformer.lora_alpha": 8}
    assert "rank 4" in merge_error(tmp_path, tensors, metadata={"lora_adapter_metadata": json.dumps(metadata)})


@pytest.mark.parametrize("tensors", [{}, {"blocks.0.attn1.to_q.weight": torch.ones(48, 48)},
                                     {"diffusion_model.blocks.0.self_attn.q.weight": torch.ones(48, 48)},
                                     {"diffusion_model.blocks.0.norm3.diff": torch.zeros(48)}],
                         ids=["empty", "full-weights", "full-wan-weights", "zeros-only"])
def test_a_file_without_a_lora_is_an_error(tmp_path, tensors):
    assert "no LoRA" in merge_error(tmp_path, tensors)


def test_a_bad_second_lora_leaves_the_first_unmerged(tmp_path):
    model = make_wan(seed=8)
    good = write_comfyui(Writer(model, seed=26), tmp_path)
    save_file({"nonsense": torch.ones(2)}, tmp_path / "bad.safetensors")
    state, base = fresh_state(model), fresh_state(model)
    with pytest.raises(LoraError, match="bad.safetensors"):
        merge_base_loras(state, [LoraSpec(good), LoraSpec(tmp_path / "bad.safetensors")])
    assert all(torch.equal(state[k], base[k]) for k in base)


@pytest.mark.parametrize("name, problem", [("lora.pt", "pickled weights are never loaded"),
                                           ("missing.safetensors", "not found")])
def test_file_problems_are_one_line_errors(tmp_path, name, problem):
    if name.endswith(".pt"):
        (tmp_path / name).write_bytes(b"\x80\x04")
    with pytest.raises(LoraError, match=problem):
        merge_base_loras(fresh_state(make_wan(seed=8)), [LoraSpec(tmp_path / name)])


@pytest.mark.parametrize("text, path, scale", [
    ("a.safetensors", "a.safetensors", 1.0),
    ("a.safetensors:0.5", "a.safetensors", 0.5),
    ("/x:y/a.safetensors:1e-1", "/x:y/a.safetensors", 0.1),
    ("/x:y/a.safetensors", "/x:y/a.safetensors", 1.0),
    ("dir:a.safetensors", "dir:a.safetensors", 1.0),
    ("loras/style:-0.25", "loras/style", -0.25),
    ("my:lora:1", "my:lora", 1.0),
])
def test_spec_parse(text, path, scale):
    spec = LoraSpec.parse(text)
    assert spec == LoraSpec(Path(path), scale)
    assert LoraSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text", ["a.safetensors:abc", ":0.5", "", "a.safetensors:nan", "a.safetensors:inf"])
def test_spec_parse_refuses(text):
    with pytest.raises(LoraError) as caught:
        LoraSpec.parse(text)
    assert "\n" not in str(caught.value) and repr(text) in str(caught.value)


@pytest.mark.parametrize("path", ["/tmp/a:0.5", "x:y/z", "plain.safetensors", "odd:name.safetensors:2"])
def test_spec_str_round_trips_awkward_paths(path):
    spec = LoraSpec(Path(path), 0.3)
    assert LoraSpec.parse(str(spec)) == spec
