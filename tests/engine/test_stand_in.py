"""Stand-In (``engine.adapters.stand_in``, ``ref_rope="past_grid"``, ``ref_cross_attention=False``) against an
independent float64 formulation of its authors' forward, and the converter's refusals.

The oracle below was written from reading WeChatCV/Stand-In at cceec58 (2026-02-21): ``models/wan_video_dit.py``
(``SelfAttention.forward`` with its ``kv_cache``, ``DiTBlock.forward`` with ``x_ip``, ``precompute_freqs_cis``'s
table starting at position -1, ``WanModel.forward``'s ``freqs_ip``), ``models/set_condition_branch.py`` (the
``blocks.{i}.self_attn.{q,k,v}_loras.{down,up}.weight`` keys, rank 128) and ``pipelines/wan_video.py`` (the positive
row with ``ip_image`` builds the cache, the negative row and every later step read it; ``model_fn_wan_video``), and
``schedulers/flow_match.py`` for their sampler. It runs one guidance row per call as their pipeline does, in their
module names mapped from diffusers' by hand.
"""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.adapters.stand_in import STAND_IN_CONFIG, adapter_tensors, convert_stand_in, read_stand_in
from engine.backbones.registry import load_denoiser
from engine.checkpoint import Checkpoint
from engine.errors import AdapterError
from engine.generation import DENOISER_INPUTS
from engine.runtime.denoiser import Denoiser
from engine.streams.positions import rd_rope_positions
from engine.tiny import ensure_tiny

from .conftest import make_wan

# Stand-In's float64 oracle vs our float32 denoiser: measured 7.0e-7 to 1.1e-6 relative over both rows, first and
# later step, cached and recomputed (AMD EPYC, torch 2.13); the issue asks < 1e-5
STAND_IN_RTOL = 3e-6
RANK = 8  # a small rank for the tests; Stand-In's is 128 (the converter's default)
T2V = dict(in_channels=16, image_dim=None, added_kv_proj_dim=None)


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(hash(request.node.name) % 2**31)


def _stand_in_lora(gen, dim: int, layers: int, rank: int = RANK) -> dict[str, torch.Tensor]:
    return {f"blocks.{i}.self_attn.{p}_loras.{half}.weight":
            torch.randn((rank, dim) if half == "down" else (dim, rank), generator=gen) * 0.2
            for i in range(layers) for p in "qkv" for half in ("down", "up")}


@pytest.fixture(scope="module")
def stand_in_case(tiny_cache, tmp_path_factory):
    """A Wan2.1-T2V pipeline directory (the tiny Stand-In's parts, a random transformer with every weight
    non-trivial) and a Stand-In .ckpt for it converted by the converter: (checkpoint dir, adapter dir, the diffusers
    model, the LoRA in Stand-In's names)."""
    root = tmp_path_factory.mktemp("stand-in")
    base = ensure_tiny(tiny_cache, "tiny-standin")
    shutil.copytree(base, root / "model", ignore=shutil.ignore_patterns("transformer", "adapter"))
    model = make_wan(seed=11, **T2V)
    model.save_pretrained(root / "model" / "transformer", safe_serialization=True)
    lora = _stand_in_lora(torch.Generator().manual_seed(5), model.config.num_attention_heads
                          * model.config.attention_head_dim, model.config.num_layers)
    torch.save(lora, root / "Stand-In_test.ckpt")
    adapter = convert_stand_in(root / "Stand-In_test.ckpt", root / "adapter", rank=RANK)
    return root / "model", adapter, model, lora


class StandInOracle:
    """Stand-In's ``WanModel`` forward with its per-block reference K/V cache, in float64, one guidance row per
    call: given the face latent it runs the reference tokens beside the video and keeps each block's rotated
    k_ip / v_ip; without it, it reads them (their negative row and every later step)."""

    def __init__(self, model, lora: dict):
        self.w = {k: v.double() for k, v in model.state_dict().items()}
        self.lora = {k: v.double() for k, v in lora.items()}
        cfg = model.config
        self.heads, self.layers, self.freq_dim = cfg.num_attention_heads, cfg.num_layers, cfg.freq_dim
        self.dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.eps = cfg.eps
        self.kv_cache: list = [None] * self.layers

    # their modules, in diffusers' names
    def linear(self, x, name):
        return x @ self.w[f"{name}.weight"].T + self.w[f"{name}.bias"]

    def rms(self, x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w[f"{name}.weight"]

    def layer_norm(self, x, name=None):
        affine = (self.w[f"{name}.weight"], self.w[f"{name}.bias"]) if name else (None, None)
        return F.layer_norm(x, (self.dim,), *affine, eps=self.eps)

    def time(self, timestep):
        half = self.freq_dim // 2
        sinusoid = torch.outer(timestep.double(), 10000 ** (-torch.arange(half, dtype=torch.float64) / half))
        t = torch.cat([sinusoid.cos(), sinusoid.sin()], dim=1)
        t = self.linear(F.silu(self.linear(t, "condition_embedder.time_embedder.linear_1")),
                        "condition_embedder.time_embedder.linear_2")
        return t, self.linear(F.silu(t), "condition_embedder.time_proj").unflatten(1, (6, self.dim))

    def rope(self, x, pos):
        """Their rope_apply: (t, h, w) bands of d - 2(d//3), d//3, d//3 channels, pair j of a band of n turning by
        pos * 10000**(-2j/n), pairs interleaved as complex numbers."""
        d = x.shape[-1]
        angles = []
        for axis, n in enumerate((d - 2 * (d // 3), d // 3, d // 3)):
            freqs = 10000.0 ** (-torch.arange(0, n, 2, dtype=torch.float64)[: n // 2] / n)
            angles.append(pos[:, axis, None].double() * freqs)
        rotation = torch.polar(torch.ones(pos.shape[0], d // 2, dtype=torch.float64), torch.cat(angles, dim=1))
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(pairs * rotation[None, :, None]).flatten(-2)

    def attention(self, q, k, v):  # [1, N, H, d] each
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).flatten(2)

    def split(self, x):
        return x.unflatten(-1, (self.heads, -1))

    def ffn(self, x, i):
        hidden = F.gelu(self.linear(x, f"blocks.{i}.ffn.net.0.proj"), approximate="tanh")
        return self.linear(hidden, f"blocks.{i}.ffn.net.2")

    def block(self, i, x, context, t_mod, pos, x_ip, t_mod_ip, pos_ip):
        b = f"blocks.{i}"
        shift, scale, gate, c_shift, c_scale, c_gate = (self.w[f"{b}.scale_shift_table"] + t_mod).chunk(6, dim=1)
        h = self.layer_norm(x) * (1 + scale) + shift
        q = self.rope(self.split(self.rms(self.linear(h, f"{b}.attn1.to_q"), f"{b}.attn1.norm_q")), pos)
        k = self.rope(self.split(self.rms(self.linear(h, f"{b}.attn1.to_k"), f"{b}.attn1.norm_k")), pos)
        v = self.split(self.linear(h, f"{b}.attn1.to_v"))
        if x_ip is not None:  # the face's LoRA'd q/k/v, its own attention, and the cache of the rotated k/v
            mod_ip = (self.w[f"{b}.scale_shift_table"] + t_mod_ip).chunk(6, dim=1)
            h_ip = self.layer_norm(x_ip) * (1 + mod_ip[1]) + mod_ip[0]

            def projected(p, name):
                lora = self.lora
                down, up = (lora[f"{b}.self_attn.{p}_loras.{half}.weight"] for half in ("down", "up"))
                delta = h_ip @ down.T @ up.T
                return self.linear(h_ip, f"{b}.attn1.{name}") + delta

            q_ip = self.rope(self.split(self.rms(projected("q", "to_q"), f"{b}.attn1.norm_q")), pos_ip)
            k_ip = self.rope(self.split(self.rms(projected("k", "to_k"), f"{b}.attn1.norm_k")), pos_ip)
            v_ip = self.split(projected("v", "to_v"))
            self.kv_cache[i] = (k_ip, v_ip)
            out_ip = self.linear(self.attention(q_ip, k_ip, v_ip), f"{b}.attn1.to_out.0")
        k_ip, v_ip = self.kv_cache[i]
        out = self.linear(self.attention(q, torch.cat([k, k_ip], 1), torch.cat([v, v_ip], 1)), f"{b}.attn1.to_out.0")
        x = x + gate * out
        # cross-attention on the video only (their norm3 is diffusers' affine norm2)
        cq = self.linear(self.layer_norm(x, f"{b}.norm2"), f"{b}.attn2.to_q")
        cq = self.split(self.rms(cq, f"{b}.attn2.norm_q"))
        ck = self.split(self.rms(self.linear(context, f"{b}.attn2.to_k"), f"{b}.attn2.norm_k"))
        cv = self.split(self.linear(context, f"{b}.attn2.to_v"))
        x = x + self.linear(self.attention(cq, ck, cv), f"{b}.attn2.to_out.0")
        x = x + c_gate * self.ffn(self.layer_norm(x) * (1 + c_scale) + c_shift, i)
        if x_ip is not None:  # no cross-attention for the face tokens
            x_ip = x_ip + mod_ip[2] * out_ip
            x_ip = x_ip + mod_ip[5] * self.ffn(self.layer_norm(x_ip) * (1 + mod_ip[4]) + mod_ip[3], i)
        return x, x_ip

    def patchify(self, latents):
        x = F.conv3d(latents.double(), self.w["patch_embedding.weight"], self.w["patch_embedding.bias"], stride=(1, 2, 2))
        return x.flatten(2).transpose(1, 2), x.shape[2:]

    def grid(self, f, h, w, t0, h0, w0):
        axes = torch.meshgrid(torch.arange(f) + t0, torch.arange(h) + h0, torch.arange(w) + w0, indexing="ij")
        return torch.stack(axes, -1).reshape(-1, 3)

    def __call__(self, latents, timestep, text, ip_latent=None):
        t, t_mod = self.time(timestep)
        context = self.linear(F.gelu(self.linear(text.double(), "condition_embedder.text_embedder.linear_1"),
                                     approximate="tanh"), "condition_embedder.text_embedder.linear_2")
        x, (f, h, w) = self.patchify(latents)
        pos = self.grid(f, h, w, 0, 0, 0)
        x_ip = t_mod_ip = pos_ip = None
        if ip_latent is not None:  # t = -1 (table index 0), h and w from index h + 1, w + 1: positions h.., w..
            x_ip, (_, hr, wr) = self.patchify(ip_latent)
            pos_ip = self.grid(1, hr, wr, -1, h, w)
            _, t_mod_ip = self.time(torch.zeros_like(timestep))
        for i in range(self.layers):
            x, x_ip = self.block(i, x, context, t_mod, pos, x_ip, t_mod_ip, pos_ip)
        shift, scale = (self.w["scale_shift_table"] + t.unsqueeze(1)).chunk(2, dim=1)
        x = self.linear(self.layer_norm(x) * (1 + scale) + shift, "proj_out")
        c = latents.shape[1]
        x = x.reshape(1, f, h, w, 1, 2, 2, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(1, c, f, h * 2, w * 2)


def _inputs(latents, timestep, text, refs) -> dict:
    return {**dict.fromkeys(DENOISER_INPUTS), "latents": latents, "timestep": timestep, "text": text,
            "ref_latents": refs}


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("cache_references", [True, False], ids=["cached", "recomputed"])
def test_first_and_later_step_both_rows_equal_stand_ins_forward(stand_in_case, gen, cache_references):
    path, adapter, model, lora = stand_in_case
    den = Denoiser(Checkpoint.load(path, adapter, dtype="float32"))
    assert den.model.config.shares_reference_rows
    # awkward sizes: a 3 x 3 x 5 video token grid, a 4 x 3 face grid; cond and uncond prompts differ
    text = torch.randn(2, 512, model.config.text_dim, generator=gen)
    face = torch.randn(1, 1, 16, 8, 6, generator=gen)
    oracle = StandInOracle(model, lora)
    for step, timestep in enumerate((torch.tensor([999.0]), torch.tensor([437.5]))):
        latents = torch.randn(1, 16, 3, 6, 10, generator=gen)
        refs = face.expand(2, -1, -1, -1, -1) if step == 0 or not cache_references else None
        ours = den(_inputs(latents.expand(2, -1, -1, -1, -1), timestep.expand(2), text, refs), "request",
                   cache_references)
        # their loop: the positive row with ip_image (first step only), then the negative row from the cache
        positive = oracle(latents, timestep, text[:1], face[:, 0, :, None] if step == 0 else None)
        negative = oracle(latents, timestep, text[1:])
        assert _rel(ours[:1], positive) < STAND_IN_RTOL, f"step {step}, positive row"
        assert _rel(ours[1:], negative) < STAND_IN_RTOL, f"step {step}, negative row"
        assert _rel(positive, negative) > 1e-2  # the rows differ: each comparison tells them apart
    if cache_references:  # built once for the request, one row for both guidance rows
        assert den.caches.builds == 1 and den.caches.get("request").rows == 1


def test_the_whole_loop_equals_stand_ins_with_its_sampler_and_guidance(stand_in_case):
    """Their denoising loop (``WanVideoPipeline.__call__``: FlowMatchScheduler(shift=5, sigma_min=0,
    extra_one_step=True), the positive row with the face at the first step, the negative row from the cache,
    ``nega + cfg (posi - nega)``, Euler to sigma 0) over the latents, prompts and face our stages encoded, against
    ``--scheduler euler_linear`` with the cache."""
    from engine.pipeline import MultiViewPipeline

    path, adapter, model, lora = stand_in_case
    pipe = MultiViewPipeline.from_pretrained(path, adapter, scheduler="euler_linear")
    face = np.random.default_rng(4).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    steps, shift, cfg = 4, 5.0, 5.0
    request = pipe.make_request(references=[face], ref_size=(48, 32), prompt="a woman smiles", negative_prompt="blur",
                                seed=9, steps=steps, shift=shift, guidance_scale=cfg, num_frames=9, height=48,
                                width=80)
    state = pipe.prepare(request)
    latents, text, face_latent = state.latents.double(), state.text, state.ref_latents[:1, 0, :, None]
    ours = pipe.denoise(state)

    oracle = StandInOracle(model, lora)
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    for i, sigma in enumerate(sigmas):
        timestep = (sigma * 1000).reshape(1)
        positive = oracle(latents, timestep, text[:1], face_latent if i == 0 else None)
        negative = oracle(latents, timestep, text[1:])
        latents = latents + (negative + cfg * (positive - negative)) * ((sigmas[i + 1] if i + 1 < steps else 0) - sigma)
    # float32 loop against float64: measured 6.6e-7 relative on the final latents (diffusers' own Euler spacing,
    # `--scheduler euler`, is 0.15 away: the sampler is what this tells apart, with the cache and the guidance)
    assert _rel(ours, latents) < STAND_IN_RTOL


def test_the_face_matters_and_the_prompt_never_reaches_it(stand_in_case, gen):
    path, adapter, model, _ = stand_in_case
    den = Denoiser(Checkpoint.load(path, adapter, dtype="float32"))
    face = torch.randn(1, 1, 16, 8, 6, generator=gen)
    texts = torch.randn(2, 1, 512, model.config.text_dim, generator=gen)
    caches = [den.model.precompute_reference(face, text, None, (3, 6, 10)) for text in texts]
    assert all(torch.equal(a, b) for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values))
    latents = torch.randn(1, 16, 3, 6, 10, generator=gen)
    with_face = den(_inputs(latents, torch.tensor([500.0]), texts[0], face), None)
    without = den(_inputs(latents, torch.tensor([500.0]), texts[0], None), None)
    assert _rel(with_face, without) > 1e-2


def test_past_grid_places_the_face_at_t_minus_one_past_the_video_grid():
    pos = rd_rope_positions("past_grid", 1, (2, 3), (4, 5, 7))
    assert pos.tolist() == [[-1, h, w] for h in (5, 6) for w in (7, 8, 9)]


def test_converter_writes_our_adapter_format(stand_in_case):
    from safetensors.torch import load_file

    _, adapter, _, lora = stand_in_case
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert set(tensors) == {f"ref_blocks.{i}.attn1.to_{p}.lora_{ab}.weight" for i in range(2) for p in "qkv"
                            for ab in "AB"}
    assert torch.equal(tensors["ref_blocks.1.attn1.to_k.lora_A.weight"], lora["blocks.1.self_attn.k_loras.down.weight"])
    assert torch.equal(tensors["ref_blocks.0.attn1.to_v.lora_B.weight"], lora["blocks.0.self_attn.v_loras.up.weight"])
    config = json.loads((adapter / "mvgen_config.json").read_text())
    assert config == {**STAND_IN_CONFIG, "lora_rank": RANK, "lora_alpha": RANK}


def test_kijai_safetensors_reads_as_the_ckpt(stand_in_case, tmp_path):
    from safetensors.torch import save_file

    lora = stand_in_case[3]
    save_file({f"diffusion_model.{k}": v for k, v in lora.items()}, tmp_path / "Stand-In_kijai.safetensors")
    read = read_stand_in(tmp_path / "Stand-In_kijai.safetensors", rank=RANK)
    assert read.keys() == lora.keys() and all(torch.equal(read[k], lora[k]) for k in lora)
    assert adapter_tensors(read).keys() == adapter_tensors(lora).keys()


def test_kijai_safetensors_is_an_adapter_as_it_is(stand_in_case, tmp_path):
    """``--adapter Stand-In_kijai.safetensors`` (no conversion, no mvgen_config.json beside it): the same denoiser
    as the converted folder, bit for bit, with Stand-In's settings; a folder-less file of other keys is no
    Stand-In file."""
    from safetensors.torch import save_file

    from engine.adapters.stand_in import is_stand_in_file

    path, adapter, _, lora = stand_in_case
    file = tmp_path / "Stand-In_kijai.safetensors"
    save_file({f"diffusion_model.{k}": v for k, v in lora.items()}, file)
    assert is_stand_in_file(file) and not is_stand_in_file(adapter / "adapter_model.safetensors")
    direct, converted = load_denoiser(path, adapter=file), load_denoiser(path, adapter=adapter)
    assert direct.config == converted.config and not direct.config.ref_cross_attention
    state, want = direct.state_dict(), converted.state_dict()
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)


class _NotATensor:
    pass


def _refusal_cases(lora: dict) -> dict:
    first = "blocks.0.self_attn.q_loras.down.weight"
    return {
        "a non-tensor value": ({**lora, "epoch": 3}, "holds values that are not tensors: 'epoch' (int)"),
        "an object": ({**lora, "trainer": _NotATensor()}, "refused it: Unsupported global: GLOBAL tests.engine."),
        "an unexpected key": ({**lora, "blocks.0.self_attn.o_loras.down.weight": lora[first]},
                              "unexpected key(s) ['blocks.0.self_attn.o_loras.down.weight']"),
        "a wrong rank": ({**lora, first: lora[first][:RANK - 1]}, f"LoRA rank must be {RANK}"),
        "a missing half": ({k: v for k, v in lora.items() if k != first}, f"missing ['{first}']"),
    }


@pytest.mark.parametrize("case", ["a non-tensor value", "an object", "an unexpected key", "a wrong rank",
                                  "a missing half"])
def test_converter_refuses_in_one_line(stand_in_case, tmp_path, case):
    from mvgen.cli import main

    contents, words = _refusal_cases(stand_in_case[3])[case]
    torch.save(contents, tmp_path / "bad.ckpt")
    with pytest.raises(AdapterError) as refused:
        convert_stand_in(tmp_path / "bad.ckpt", tmp_path / "out", rank=RANK)
    message = str(refused.value)
    assert words in message and "\n" not in message, message
    assert not (tmp_path / "out").exists()  # nothing written
    assert main(["convert", "stand-in", str(tmp_path / "bad.ckpt"), str(tmp_path / "out"), "--rank", str(RANK)]) == 2


@pytest.mark.parametrize("name, content, words", [
    ("cut.ckpt", b"PK\x03\x04 cut short", "not a checkpoint of plain tensors"),
    ("weights.npz", b"", "the authors' .ckpt or kijai's .safetensors, got a .npz file"),
])
def test_converter_refuses_what_is_no_stand_in_file(tmp_path, name, content, words):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(AdapterError, match=words) as refused:
        read_stand_in(tmp_path / name)
    assert "\n" not in str(refused.value)


def test_the_cli_converts_and_refuses_a_default_rank_mismatch(stand_in_case, tmp_path, capsys):
    from mvgen.cli import main

    torch.save(stand_in_case[3], tmp_path / "ok.ckpt")
    assert main(["convert", "stand-in", str(tmp_path / "ok.ckpt"), str(tmp_path / "out"), "--rank", str(RANK)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert main(["convert", "stand-in", str(tmp_path / "ok.ckpt"), str(tmp_path / "out2")]) == 2  # 128 expected
    assert "LoRA rank must be 128" in capsys.readouterr().err
    assert main(["convert", "stand-in", str(tmp_path / "ok.ckpt"), str(tmp_path / "out"), "--rank", str(RANK)]) == 2
    assert "is not an empty directory" in capsys.readouterr().err


def test_stand_ins_sampler_is_euler_over_linear_sigmas_with_shift_5(tiny_cache):
    """DiffSynth's FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True), as their pipeline builds it,
    formulated here from its set_timesteps/step: sigmas linspace(1, 0, n + 1)[:-1], shifted, Euler to 0."""
    ensure_tiny(tiny_cache, "tiny-standin")
    checkpoint = Checkpoint.load("tiny-standin", cache_root=tiny_cache, scheduler="euler_linear")
    steps, shift = 7, 5.0
    scheduler = checkpoint.make_scheduler(shift)
    checkpoint.set_timesteps(scheduler, steps)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    assert torch.allclose(scheduler.timesteps, sigmas * 1000, rtol=0, atol=1e-3)
    sample = torch.randn(1, 4, generator=torch.Generator().manual_seed(0))
    want = sample.clone()
    for i, t in enumerate(scheduler.timesteps):
        velocity = torch.full_like(sample, math.cos(i))
        sample = scheduler.step(velocity, t, sample, return_dict=False)[0]
        nxt = sigmas[i + 1] if i + 1 < steps else 0.0
        want = want + velocity * (nxt - sigmas[i])
    assert torch.allclose(sample, want, atol=1e-6)
    unipc = Checkpoint.load("tiny-standin", cache_root=tiny_cache)  # the default spacing differs
    default = unipc.make_scheduler(shift)
    unipc.set_timesteps(default, steps)
    assert not torch.allclose(default.timesteps.float(), scheduler.timesteps.float(), atol=1.0)
