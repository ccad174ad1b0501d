"""A checkpoint's parts, loaded one by one: each served model (and the in-process pipeline) holds only its own.

``Checkpoint`` is the weightless description every part starts from: the denoiser's config, the VAE's
latent layout, the scheduler, generation defaults and request limits, read from the JSON files of a
diffusers Wan or HunyuanVideo (MMDiT) directory, plus where and in what dtype the parts run. The generation loop
needs nothing else, so the server's loop model loads no weights at all. ``TextEncoder``, ``ImageEncoder``, ``Vae``
and ``Denoiser`` each load one sub-folder; an MMDiT's text encoders and VAE are ``engine.backbones.mmdit.components``'
(``text_encoder_class``, ``vae_class`` pick the family's).
"""
from __future__ import annotations

import contextlib
import dataclasses
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .runtime.batch_invariance import batch_invariant_ops
from .config import MvgenConfig
from .backbones.wan.model import ContextCache, ReferenceCache
from .backbones.families import ALL_TEXT_OUTPUTS, family_of
from .denoiser_io import STEP_INPUTS, step_only, text_outputs
from .runtime.offload import apply_offload, check_offload
from .runtime.parallel import ParallelRuntime
from .errors import CollectiveError
from .runtime.reference_cache import ReferenceCacheStore
from .errors import ReferenceCacheMiss
from .runtime.step_cache import StepCache
from .validation import DEFAULT_MAX_TOKENS, RequestLimits

SCHEDULERS = ("unipc", "euler")


@contextlib.contextmanager
def quiet_hub_progress():
    """Hide transformers'/diffusers' per-file loading bars (restored afterwards); our own bar stays."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for module, _ in was:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in was:
            if enabled:
                module.enable_progress_bar()


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


DTYPES = ("auto", "float32", "bfloat16", "float16")  # what the denoiser and text encoder run in ("auto": below)
# x86 /proc/cpuinfo flags of bf16 dot-product instructions, which PyTorch's CPU GEMMs (oneDNN) use for bf16
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def default_dtype(device: str | torch.device) -> torch.dtype:
    """What ``dtype="auto"`` means on ``device``: bfloat16 on CUDA (Wan's own inference dtype); on a CPU, bfloat16
    only where it multiplies bf16 natively (``NATIVE_BF16_FLAGS``), else float32. Without those instructions
    PyTorch converts bf16 matmuls to fp32 and back: a tiny denoiser step ran ~9x slower in bf16 than in fp32
    on an AVX2 AMD EPYC; with AMX a bf16 matmul is several times faster than fp32. Other devices: float32."""
    device = resolve_device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and set(NATIVE_BF16_FLAGS) & cpu_flags():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """A name of ``DTYPES`` or a torch dtype -> the torch dtype (``"auto"``: ``default_dtype(device)``)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return default_dtype(device) if name == "auto" else getattr(torch, name)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux x86); empty where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


@dataclass(frozen=True)
class VaeTiling:
    """Decode (and encode) the VAE in overlapping spatial tiles: ``AutoencoderKLWan.enable_tiling``'s sizes in
    pixels, diffusers' defaults. A video larger than a tile is cut into tiles ``tile`` wide every ``stride``
    pixels and the overlaps blended; peak memory then follows the tile, not the frame."""

    tile_height: int = 256
    tile_width: int = 256
    stride_height: int = 192
    stride_width: int = 192

    @classmethod
    def parse(cls, value: "bool | dict | VaeTiling | None") -> "VaeTiling | None":
        """``True`` (the defaults), a dict of fields (a served model's JSON), a ``VaeTiling``, or None/False (off)."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, dict):
            names = [f.name for f in dataclasses.fields(cls)]
            unknown = sorted(set(value) - set(names))
            if unknown:
                raise ValueError(f"vae_tiling takes {', '.join(names)}; got {', '.join(unknown)}")
            return cls(**value)
        if isinstance(value, cls):
            return value
        raise ValueError(f"vae_tiling must be True, a dict of tile sizes or a VaeTiling, got {value!r}")

    def check(self, spatial: int) -> None:
        """Tiles and strides whole latent cells (``spatial`` pixels), each stride at most its tile."""
        for axis in ("height", "width"):
            tile, stride = getattr(self, f"tile_{axis}"), getattr(self, f"stride_{axis}")
            if isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0 or tile % spatial:
                raise ValueError(f"vae_tiling tile_{axis} must be a positive multiple of {spatial} pixels, "
                                 f"got {tile!r}")
            if isinstance(stride, bool) or not isinstance(stride, int) or not 0 < stride <= tile or stride % spatial:
                raise ValueError(f"vae_tiling stride_{axis} must be a multiple of {spatial} pixels in (0, tile_{axis} "
                                 f"= {tile}], got {stride!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


EXPERT_FOLDERS = ("transformer", "transformer_2")  # diffusers' Wan2.2 layout: high noise, then low noise


@dataclass(frozen=True)
class Expert:
    """One denoiser of a checkpoint, as it will be loaded: Wan2.1 has one, Wan2.2-A14B two (``transformer`` for
    the high-noise steps, ``transformer_2`` for the low-noise ones), each with its own weights, base-model
    LoRAs and reference-stream adapter."""

    folder: str  # sub-folder of the checkpoint holding config.json (and the weights unless weights_file)
    config: MvgenConfig
    adapter: Path | None = None  # the reference stream's LoRA / full tensors
    weights_file: Path | None = None  # a single-file transformer (original Wan / ComfyUI names)
    loras: tuple = ()  # base-model LoRAs (engine.adapters.base_lora.LoraSpec), merged in order
    lora_reference: bool = False  # merge the base LoRAs into the reference stream too


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint is and how it runs, without a single weight.

    ``experts`` are its denoisers (Wan2.2: two, switched at ``boundary_ratio`` of the training timesteps);
    ``latents_mean``/``latents_std`` are the VAE's per-channel normalisation, ``defaults`` the generation
    defaults (``mvgen_defaults.json`` over Wan's), ``limits`` what a request may ask for. ``offload``
    (``engine.runtime.offload.OFFLOAD_MODES``) keeps the denoiser in host memory between uses; ``vae_tiling`` decodes and
    encodes in tiles (None: whole frames).
    """

    path: Path
    experts: tuple[Expert, ...]
    boundary_ratio: float | None
    dtype: torch.dtype
    device: torch.device
    scheduler: str
    scheduler_config: dict
    defaults: dict
    limits: RequestLimits
    vae_scale_temporal: int
    vae_scale_spatial: int
    latent_channels: int
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]
    has_image_encoder: bool
    overrides: dict = field(default_factory=dict)
    offload: str = "none"
    vae_tiling: VaeTiling | None = None

    @classmethod
    def load(cls, model: str | Path = "tiny", adapter: str | Path | None = None, *, adapter_2: str | Path | None = None,
             transformer_file: str | Path | None = None, transformer_2_file: str | Path | None = None,
             loras: Sequence = (), loras_2: Sequence = (), lora_reference: bool = False,
             dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu", scheduler: str = "unipc",
             max_tokens: int = DEFAULT_MAX_TOKENS, cache_root: str | Path | None = None, offload: str = "none",
             vae_tiling: bool | dict | VaeTiling | None = None, **overrides) -> "Checkpoint":
        """Read the JSON files of a diffusers Wan directory (Wan2.1-T2V/I2V, Wan2.2-I2V-A14B), a HunyuanVideo
        (MMDiT) directory or an embedded ``tiny*`` model; ``overrides`` go to every expert's ``MvgenConfig``. The
        ``*_2`` arguments are Wan2.2's low-noise expert's (``loras_2`` default: none; ``adapter_2``: the tiny
        model's own). An MMDiT runs its own ``FlowMatchEulerDiscreteScheduler`` whatever ``scheduler`` says (its
        pipelines know no other; ``"unipc"`` is every command's default, so it cannot be told from a choice here).
        Raises ``CheckpointError``/``AdapterError`` naming what is wrong."""
        from .adapters.base_lora import LoraSpec
        from .loading import denoiser_config
        from .errors import CheckpointError
        from .tiny import is_tiny, resolve_experts

        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        check_offload(offload, device)
        vae_tiling = VaeTiling.parse(vae_tiling)
        if is_tiny(model) and cache_root is None:
            raise ValueError(f"the embedded {str(model)!r} model needs a cache_root to build it in")
        path, adapters = resolve_experts(model, (adapter, adapter_2), cache_root)
        index = _read_json(path / "model_index.json", "model index")
        boundary = index.get("boundary_ratio")
        folders = [f for f in EXPERT_FOLDERS if f == "transformer" or (path / f / "config.json").is_file()]
        if len(folders) == 2 and boundary is None:
            raise CheckpointError(f"{path} has transformer_2/ but model_index.json sets no boundary_ratio (Wan2.2)")
        if boundary is not None and (isinstance(boundary, bool) or not isinstance(boundary, (int, float))
                                     or not 0 < boundary < 1 or len(folders) != 2):
            raise CheckpointError(f"{path / 'model_index.json'}: boundary_ratio must be a number in (0, 1) with a "
                                  f"transformer_2/ beside transformer/, got {boundary!r}")
        singles = (transformer_file, transformer_2_file)
        specs = ([LoraSpec.parse(str(s)) if not isinstance(s, LoraSpec) else s for s in group]
                 for group in (loras, loras_2))
        experts = tuple(
            Expert(folder, denoiser_config(path, adapters[i], folder, **overrides), adapters[i],
                   Path(singles[i]) if singles[i] is not None else None, tuple(group), lora_reference)
            for i, (folder, group) in enumerate(zip(folders, specs)))
        for name, value in (("adapter_2", adapter_2), ("transformer_2_file", transformer_2_file), ("loras_2", loras_2)):
            if value and len(experts) == 1:
                raise CheckpointError(f"{name} is for a two-expert (Wan2.2) checkpoint; {path} has one transformer")
        config = experts[0].config
        if len({e.config.max_references for e in experts}) > 1:
            raise CheckpointError(f"the experts of {path} take different max_references: "
                                  f"{[e.config.max_references for e in experts]}")
        family = family_of(config)
        family_defaults = family.defaults  # a checkpoint may ship mvgen_defaults.json
        vae = family.vae_layout(_read_json(path / "vae" / "config.json", "VAE config"))
        scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json", "scheduler config")
        shift = scheduler_config.get("flow_shift", scheduler_config.get("shift", family_defaults["shift"]))
        temporal, spatial, z_dim = vae["temporal"], vae["spatial"], vae["channels"]
        if vae_tiling is not None:
            vae_tiling.check(spatial)
        _, patch_h, patch_w = config.patch_size
        return cls(
            path=path, experts=experts, boundary_ratio=float(boundary) if boundary is not None else None, dtype=dtype,
            device=device, scheduler=family.scheduler or scheduler,
            scheduler_config=scheduler_config,
            defaults={**family_defaults, "shift": float(shift),
                      **_read_json(path / "mvgen_defaults.json", "generation defaults")},
            limits=RequestLimits(config.max_references, max_tokens, spatial * max(patch_h, patch_w), temporal,
                                 first_frame=config.task == "i2v", experts=len(experts),
                                 prototype=config.ref_attention == "prototype", identity=config.identity,
                                 multiview=config.view_attention == "multiview"),
            vae_scale_temporal=temporal, vae_scale_spatial=spatial, latent_channels=z_dim,
            latents_mean=tuple(vae["mean"]), latents_std=tuple(vae["std"]),
            has_image_encoder=config.image_dim is not None and (path / "image_encoder").is_dir(),
            overrides=dict(overrides), offload=offload, vae_tiling=vae_tiling,
        )

    @property
    def config(self) -> MvgenConfig:
        """The (first) denoiser's config: what every expert shares (task, widths, reference modes)."""
        return self.experts[0].config

    @property
    def adapter(self) -> Path | None:
        return self.experts[0].adapter

    @property
    def weights_device(self) -> torch.device:
        """Where the denoiser's weights are loaded: host memory when offloaded (``engine.runtime.offload``), else the device."""
        return self.device if self.offload == "none" else torch.device("cpu")

    def sources(self) -> dict:
        """``load``'s weight-source keywords beyond the model and first adapter, resolved to absolute paths and
        JSON values: what loads the same experts again elsewhere (the server's models, a TensorRT refit)."""
        first = self.experts[0]
        out = {"loras": [str(spec.resolved()) for spec in first.loras], "lora_reference": first.lora_reference}
        if first.weights_file is not None:
            out["transformer_file"] = str(first.weights_file.resolve())
        if len(self.experts) > 1:
            second = self.experts[1]
            out["loras_2"] = [str(spec.resolved()) for spec in second.loras]
            if second.adapter is not None:
                out["adapter_2"] = str(second.adapter.resolve())
            if second.weights_file is not None:
                out["transformer_2_file"] = str(second.weights_file.resolve())
        return out

    def load_arguments(self) -> dict:
        """JSON keywords of ``Checkpoint.load`` that describe this checkpoint again in another process (a
        sequence-parallel worker): the resolved model folder, adapter, weight sources, dtype, device, memory
        options, overrides."""
        return {"model": str(self.path), "adapter": str(self.adapter) if self.adapter else None, **self.sources(),
                "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
                "scheduler": self.scheduler, "offload": self.offload,
                "vae_tiling": self.vae_tiling.to_dict() if self.vae_tiling else None, **self.overrides}

    def expert_at(self, timestep) -> int:
        """Which expert denoises at ``timestep``: Wan2.2's high-noise ``transformer`` while t >= boundary_ratio x
        the training timesteps, then ``transformer_2`` (as diffusers' Wan pipelines switch); 0 for one expert."""
        if self.boundary_ratio is None:
            return 0
        train_steps = self.scheduler_config.get("num_train_timesteps", 1000)
        return 0 if float(timestep) >= self.boundary_ratio * train_steps else 1

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        """[1, C, (F-1)/4+1, H/8, W/8] of a video of this size."""
        s, t = self.vae_scale_spatial, self.vae_scale_temporal
        return 1, self.latent_channels, (num_frames - 1) // t + 1, height // s, width // s

    def initial_noise(self, seed: int, num_frames: int, height: int, width: int) -> torch.Tensor:
        """Noise from a CPU generator (the same numbers on every device), float32 on the checkpoint's device."""
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(self.latent_shape(num_frames, height, width), generator=generator, dtype=torch.float32)
        return noise.to(self.device)

    def make_scheduler(self, shift: float):
        """A fresh flow-matching scheduler (schedulers are stateful: one per request): ``"euler"`` is the
        checkpoint's own ``FlowMatchEulerDiscreteScheduler`` where it ships one (HunyuanVideo), else a default one;
        ``"unipc"`` Wan's UniPC over flow sigmas. Either with ``shift``."""
        from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

        config = self.scheduler_config
        if self.scheduler == "euler":
            own = config.get("_class_name") == "FlowMatchEulerDiscreteScheduler"
            return FlowMatchEulerDiscreteScheduler.from_config({**(config if own else {"num_train_timesteps": 1000}),
                                                                "shift": shift})
        base = config if config.get("_class_name") == "UniPCMultistepScheduler" else {}
        return UniPCMultistepScheduler.from_config(
            {**base, "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": shift}
        )

    def set_timesteps(self, scheduler, steps: int) -> None:
        """The request's ``steps`` timesteps on ``scheduler``: an MMDiT takes HunyuanVideo's pipelines' sigmas
        (1 down to 1/steps, before the shift); Wan's pipelines leave the spacing to the scheduler."""
        if family_of(self.config).explicit_sigmas:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], device=self.device)
        else:
            scheduler.set_timesteps(steps, device=self.device)

    def latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel mean and std as [1, C, 1, 1, 1] float32 on the device."""
        shape = (1, self.latent_channels, 1, 1, 1)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.float32, device=self.device).view(shape)  # noqa: E731
        return as_tensor(self.latents_mean), as_tensor(self.latents_std)


def prompt_clean(text: str) -> str:
    """Wan's prompt normalisation (ftfy, HTML unescape, whitespace collapse), as diffusers applies it."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """umT5 and its tokenizer (``text_encoder/``, ``tokenizer/``), in the checkpoint's dtype."""

    def __init__(self, checkpoint: Checkpoint):
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.checkpoint = checkpoint
        with quiet_hub_progress():
            folder = component_folder(checkpoint, "text_encoder")
            self.tokenizer = AutoTokenizer.from_pretrained(component_folder(checkpoint, "tokenizer", weights=False))
            self.model = UMT5EncoderModel.from_pretrained(folder, dtype=checkpoint.dtype).to(checkpoint.device).eval()

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``{"text": umT5 states [N, text_len, text_dim]}`` of N prompts, zero past each prompt's length (as Wan)."""
        ckpt = self.checkpoint
        tokens = self.tokenizer(
            [prompt_clean(t) for t in texts], padding="max_length", max_length=ckpt.config.text_len, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        mask = tokens.attention_mask.to(ckpt.device)
        states = self.model(tokens.input_ids.to(ckpt.device), mask).last_hidden_state
        # the encoder's padded rows are not zero; Wan zeroes them
        return {"text": (states * mask[..., None].to(states.dtype)).to(ckpt.dtype)}


class ImageEncoder:
    """CLIP vision (``image_encoder/``, ``image_processor/``) in float32, as in diffusers' Wan example."""

    def __init__(self, checkpoint: Checkpoint):
        from transformers import AutoImageProcessor, CLIPVisionModel

        self.checkpoint = checkpoint
        with quiet_hub_progress():
            processor = component_folder(checkpoint, "image_processor", weights=False)
            self.processor = AutoImageProcessor.from_pretrained(processor)
            folder = component_folder(checkpoint, "image_encoder")
            self.model = CLIPVisionModel.from_pretrained(folder, dtype=torch.float32).to(checkpoint.device).eval()

    @torch.no_grad()
    def __call__(self, frame: np.ndarray) -> torch.Tensor:
        """Penultimate hidden states [1, 257, image_dim] of the conditioning frame (RGB uint8), model dtype."""
        from PIL import Image

        pixels = self.processor(images=Image.fromarray(frame), return_tensors="pt").pixel_values
        out = self.model(pixel_values=pixels.to(self.checkpoint.device, torch.float32), output_hidden_states=True)
        return out.hidden_states[-2].to(self.checkpoint.dtype)


class Vae:
    """The Wan VAE (``vae/``) in float32: the I2V condition, reference latents, and decoding. With the checkpoint's
    ``vae_tiling`` diffusers' tiling is on, which tiles encoding as well as decoding (one switch in diffusers)."""

    model_class = "AutoencoderKLWan"  # the diffusers class of ``vae/`` (engine.backbones.mmdit.components.MMDiTVae: another)

    def __init__(self, checkpoint: Checkpoint):
        import diffusers

        self.checkpoint = checkpoint
        with quiet_hub_progress():
            folder = component_folder(checkpoint, "vae")
            model = getattr(diffusers, self.model_class).from_pretrained(folder, torch_dtype=torch.float32)
            self.model = model.to(checkpoint.device).eval()
        tiling = checkpoint.vae_tiling
        if tiling is not None:
            self.model.enable_tiling(tile_sample_min_height=tiling.tile_height, tile_sample_min_width=tiling.tile_width,
                                     tile_sample_stride_height=tiling.stride_height,
                                     tile_sample_stride_width=tiling.stride_width)
        self.mean, self.std = checkpoint.latent_stats()

    @torch.no_grad()
    def encode_condition(self, frame: np.ndarray, known: np.ndarray, num_frames: int) -> torch.Tensor:
        """Wan's I2V condition [1, 20, f, h, w]: 4 mask channels (1 = known) + the latent of
        [first frame, zeros x (num_frames - 1)]; ``known`` [h, w] marks the latent cells of frame 0 that are known."""
        pixels = self._pixels(frame[None])[:, :, None]  # [1, 3, 1, H, W]
        video = torch.cat([pixels, pixels.new_zeros(1, 3, num_frames - 1, *pixels.shape[-2:])], dim=2)
        latent = self._encode(video)  # [1, 16, f, h, w]
        # diffusers builds a per-pixel-frame mask (first frame x4, then one per frame) viewed as 4 channels;
        # only latent frame 0 is known, and in it exactly the known cells
        mask = latent.new_zeros(1, self.checkpoint.vae_scale_temporal, *latent.shape[2:])
        mask[:, :, 0] = torch.as_tensor(known, dtype=latent.dtype, device=latent.device)
        return torch.cat([mask, latent], dim=1)

    @torch.no_grad()
    def encode_references(self, images: np.ndarray) -> torch.Tensor:
        """R fitted reference views uint8 [R, H, W, 3], each encoded as a one-frame video: [1, R, 16, H/8, W/8]."""
        latents = self._encode(self._pixels(images)[:, :, None])  # [R, 16, 1, h, w]
        return latents[:, :, 0].unsqueeze(0)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents [1, 16, f, h, w] -> frames uint8 [F, H, W, 3]."""
        video = self.model.decode(self._denormalise(latents.to(self.checkpoint.device, torch.float32))).sample[0]
        # [3, F, H, W] in [-1, 1]
        video = ((video.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return video.permute(1, 2, 3, 0).cpu().numpy()

    def _pixels(self, images: np.ndarray) -> torch.Tensor:
        """RGB uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1]."""
        return torch.tensor(images, device=self.checkpoint.device).permute(0, 3, 1, 2).float() \
            / 127.5 - 1.0

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        """Pixels [N, 3, F, H, W] -> the VAE's normalised latents (the distribution's mode, as diffusers takes it)."""
        return self._normalise(self.model.encode(video).latent_dist.mode().float())

    def _normalise(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent - self.mean) / self.std

    def _denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.std + self.mean


class Denoiser:
    """One expert's multi-view DiT (``transformer/`` + LoRAs + adapter) and the reference K/V caches of the
    requests it serves (on Wan2.2 each expert keeps its own: the two reference streams differ).

    ``cache_bytes`` bounds the caches held at once (least recently used dropped first; a request whose cache
    was dropped sends its references again, see ``engine.generation``).
    """

    def __init__(self, checkpoint: Checkpoint, expert: int = 0, cache_bytes: int = 8 << 30,
                 parallel: ParallelRuntime | None = None):
        self.checkpoint = checkpoint
        self.expert = expert
        self.model = load_expert(checkpoint, expert)
        # --offload: the weights stay in host memory and visit the device per call (None: loaded onto it)
        self.offload = apply_offload(self.model, checkpoint.offload, checkpoint.device)
        self.caches = ReferenceCacheStore(cache_bytes)  # reference K/V per request (isolated + zero streams)
        self.requests = ReferenceCacheStore(cache_bytes)  # RequestState per request (same byte bound)
        # one rank of a sequence/CFG-parallel world (engine.runtime.parallel, engine.runtime.workers); None: the whole call here
        self.parallel = parallel
        if parallel is not None:
            self.model.parallelize(parallel.sp)
        # the text encoders' entries this family's denoiser does not take (Wan: an MMDiT's mask and pooled text),
        # which a call may carry as None (the loop and the server send every DENOISER_INPUTS name)
        family_text = text_outputs(checkpoint.experts[expert].config)
        self.foreign_inputs = set(ALL_TEXT_OUTPUTS) - set(family_text)

    @property
    def caches_references(self) -> bool:
        return self.model.config.caches_reference

    @property
    def caches_requests(self) -> bool:
        return self.model.config.caches_requests

    def release(self, cache_key: str) -> None:
        """Drop a request's caches (it finished, failed or was cancelled)."""
        self.caches.drop(cache_key)
        self.requests.drop(cache_key)

    def weight_bytes(self) -> int:
        """Bytes of the denoiser's weights, each storage once (a shared reference stream's are the video's)."""
        from .adapters.reference_weights import weight_bytes

        return weight_bytes(self.model)

    def __call__(self, inputs: dict[str, torch.Tensor | None], cache_key: str | None = None,
                 cache_references: bool = True) -> torch.Tensor:
        """One call's velocity (see ``run``); its error is raised."""
        result = self.run([DenoiseCall(inputs, cache_key, cache_references)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    @torch.no_grad()
    def run(self, calls: list["DenoiseCall"], pad_to: int = 0) -> list[torch.Tensor | Exception]:
        """Each call's velocity, or the exception that failed that call alone.

        Calls of equal shapes (and equal reference-cache layouts) run as one batch; when a batch fails, its
        calls run one by one, so a bad or failing request never takes its companions down. Rows never
        interact in the denoiser; ``pad_to`` > 0 still runs every batch at that many rows (padding repeats
        row 0), so a request's bits cannot depend on its companions whatever the GEMM library does. A
        step-cached request runs alone: its skip decision is its own.
        """
        results: list[torch.Tensor | Exception | None] = [None] * len(calls)
        groups: dict[tuple, list[_Item]] = {}
        alone = self.model.config.step_cache_threshold > 0
        for index, call in enumerate(calls):
            try:
                item = self._resolve(index, call)
            except Exception as error:  # this request's inputs or cache: its own answer, the batch goes on
                results[index] = error
                continue
            signature = tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in sorted(item.inputs.items()) if v is not None)
            key = (signature, item.reference.layout if item.reference else None, item.state is not None,
                   index if alone else None)
            groups.setdefault(key, []).append(item)
        for items in groups.values():
            self._run_group(items, results, pad_to)
        for call, result in zip(calls, results):
            if isinstance(result, Exception) and call.cache_key is not None:
                self.release(call.cache_key)  # a failed request holds no cache
        return results

    def _resolve(self, index: int, call: "DenoiseCall") -> "_Item":
        """The call's inputs and caches: its per-request state (step-invariant inputs, cross-attention K/V, step
        cache), built at its first step, which fills a later step's inputs (``inputs_once``: those carry the
        latents and the timestep only); and its reference K/V (looked up, or built from the request's references)."""
        inputs = {name: value for name, value in call.inputs.items() if name not in self.foreign_inputs}
        if call.cache_key is None:
            return _Item(index, {**inputs, "ref_latents": _references(inputs)}, None, None)
        state = self._request_state(call.cache_key, inputs)
        if state is not None and step_only(inputs):  # a later step: the rest is the request's own
            inputs = {**state.inputs, **{name: inputs[name] for name in STEP_INPUTS}}
        refs = _references(inputs)
        if not (call.cache_references and self.caches_references):
            return _Item(index, {**inputs, "ref_latents": refs}, None, state)
        cache = self.caches.get(call.cache_key)
        if cache is None:
            if refs is None:
                raise ReferenceCacheMiss(call.cache_key)
            cache = self.model.precompute_reference(refs, inputs["text"], inputs["image_context"],
                                                    latent_fhw=tuple(inputs["latents"].shape[2:]))
            self.caches.put(call.cache_key, cache)
        return _Item(index, {**inputs, "ref_latents": None}, cache, state)

    def _request_state(self, key: str, inputs: dict) -> "RequestState | None":
        """The request's state, built (or rebuilt, at other rows) from a call that carries every input; a call
        that carries only the step's inputs needs it to exist (else a ``ReferenceCacheMiss``: the loop sends
        everything again, as for an evicted reference cache)."""
        cfg = self.model.config
        if not cfg.caches_requests:
            return None
        state = self.requests.get(key)
        if step_only(inputs):
            if state is None or not state.inputs:
                raise ReferenceCacheMiss(key, "step-invariant inputs")
            return state
        rows = inputs["latents"].shape[0]
        if state is None or state.rows != rows or cfg.inputs_once:
            context = state.context if state is not None and state.rows == rows else None
            if context is None and cfg.caches_context:  # the same states at every step of the request: K/V once
                context = self.model.precompute_context(inputs["text"], inputs["image_context"],
                                                        inputs.get("identity_context"))
            step = state.step if state is not None and state.rows == rows else None
            if step is None and cfg.step_cache_threshold > 0:
                step = StepCache(cfg.step_cache_threshold)
            kept = {name: value for name, value in inputs.items() if name not in STEP_INPUTS} if cfg.inputs_once else {}
            state = RequestState(rows, context, step, kept)
            self.requests.put(key, state)
        return state

    def _run_group(self, items: list["_Item"], results: list, pad_to: int) -> None:
        try:
            outputs = self._forward(items, pad_to)
        except CollectiveError:  # the process group's failure, not a request's: no one-by-one retry
            raise
        except Exception as error:
            if len(items) == 1:
                results[items[0].index] = error
                return
            for item in items:  # find which request fails; the others are answered
                self._run_group([item], results, pad_to)
            return
        for item, velocity in zip(items, outputs):
            results[item.index] = velocity

    def _forward(self, items: list["_Item"], pad_to: int) -> list[torch.Tensor]:
        inputs = [item.inputs for item in items]
        sizes = [part["latents"].shape[0] for part in inputs]
        rows = sum(sizes)
        # absent inputs (a T2V condition, image context without CLIP) stay None
        batch = {name: torch.cat([part[name] for part in inputs]) if value is not None else None
                 for name, value in inputs[0].items()}
        if pad_to > rows:
            batch = {name: torch.cat([t, t[:1].expand(pad_to - rows, *t.shape[1:])]) if t is not None else None
                     for name, t in batch.items()}
        caches = dict(
            ref_cache=ReferenceCache.cat([i.reference for i in items], pad_to) if items[0].reference else None,
            context_cache=(ContextCache.cat([i.state.context for i in items], pad_to)
                           if items[0].state is not None and items[0].state.context is not None else None),
            step_cache=items[0].state.step if items[0].state is not None else None)  # step-cached: one request
        if caches["step_cache"] is not None:
            caches["step_cache"].real_rows = rows
        with batch_invariant_ops(self.model.config.deterministic):
            if self.parallel is not None:
                velocity = self.parallel.forward(self.model, batch, **caches)
            else:
                velocity = self.model(**batch, **caches)
        return list(velocity[:rows].split(sizes))


@dataclass
class RequestState:
    """What a denoiser keeps of one request between its steps, besides its reference K/V: every block's
    cross-attention K/V of its text/image/identity states, its step cache, and (``inputs_once``) its
    step-invariant inputs as its first step sent them, by ``DENOISER_INPUTS`` name (``rows`` rows each)."""

    rows: int
    context: ContextCache | None
    step: StepCache | None
    inputs: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        kept = sum(t.numel() * t.element_size() for t in self.inputs.values() if t is not None)
        return kept + sum(part.nbytes for part in (self.context, self.step) if part is not None)


def _references(inputs: dict) -> torch.Tensor | None:
    """A call's reference latents, None when it has none (absent, or R = 0 as the wire sends none)."""
    refs = inputs.get("ref_latents")
    return refs if refs is not None and refs.shape[1] > 0 else None


@dataclass
class _Item:
    """A resolved call: its index in the batch of calls, inputs, reference cache and request state."""

    index: int
    inputs: dict
    reference: ReferenceCache | None
    state: RequestState | None


def load_expert(checkpoint: Checkpoint, expert: int = 0, lora_scale: float | None = None):
    """The ``MultiViewWanTransformer`` of one expert of ``checkpoint``, its LoRAs and adapter merged."""
    from .loading import load_denoiser

    spec = checkpoint.experts[expert]
    return load_denoiser(checkpoint.path, spec.adapter, dtype=checkpoint.dtype, device=checkpoint.weights_device,
                         lora_scale=lora_scale, folder=spec.folder, weights_file=spec.weights_file, loras=spec.loras,
                         lora_reference=spec.lora_reference, **checkpoint.overrides)


@dataclass
class DenoiseCall:
    """One request's denoiser step: inputs by ``DENOISER_INPUTS`` name (``ref_latents`` None or with R = 0 when
    there are none) and the request's cache key, under which the denoiser keeps what the request reuses."""

    inputs: dict[str, torch.Tensor | None]
    cache_key: str | None = None
    cache_references: bool = True  # False: the reference stream is recomputed at every step (--no-reference-cache)


def text_encoder_class(checkpoint: Checkpoint) -> type:
    """The family's text encoder: umT5 (Wan) or HunyuanVideo's Llama + CLIP (``engine.backbones.mmdit.components``)."""
    if checkpoint.config.family == "mmdit":
        from .backbones.mmdit.components import MMDiTTextEncoder

        return MMDiTTextEncoder
    return TextEncoder


def vae_class(checkpoint: Checkpoint) -> type:
    """The family's VAE: Wan's or HunyuanVideo's (``engine.backbones.mmdit.components``)."""
    if checkpoint.config.family == "mmdit":
        from .backbones.mmdit.components import MMDiTVae

        return MMDiTVae
    return Vae


def component_folder(checkpoint: Checkpoint, name: str, weights: bool = True) -> Path:
    """A sub-folder of the checkpoint, its safetensors checked before a loader sees them."""
    from .loading import check_component
    from .errors import CheckpointError

    folder = checkpoint.path / name
    if not folder.is_dir():
        raise CheckpointError(f"{checkpoint.path} has no {name}/ folder (a diffusers pipeline directory has one)")
    check_component(folder, weights)
    return folder


def _read_json(path: Path, what: str) -> dict:
    """A JSON file of the checkpoint, refused in one line when unreadable; {} when absent (defaults apply)."""
    from .loading import read_checkpoint_json

    return read_checkpoint_json(path, what) if path.exists() else {}
