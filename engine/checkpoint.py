"""The weightless description every served part starts from.

``Checkpoint`` reads the JSON files of a diffusers Wan or HunyuanVideo (MMDiT) directory: the denoiser's config per
expert, the VAE's latent layout, the scheduler, generation defaults and request limits, plus where and in what dtype
the parts run. The generation loop needs nothing else, so the server's loop model loads no weights at all. Each part
then loads one sub-folder: the family's encoders and VAE (``engine.backbones.registry``), the denoiser
(``engine.runtime.denoiser``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .config import MvgenConfig
from .devices import resolve_device, resolve_dtype
from .backbones.families import family_of
from .runtime.offload import check_offload
from .validation import DEFAULT_MAX_TOKENS, RequestLimits

# "euler_linear": the flow-matching Euler scheduler over sigmas spaced linearly from 1 to 1/steps before the shift
# (DiffSynth's FlowMatchScheduler(sigma_min=0, extra_one_step=True), which Stand-In's pipeline runs; HunyuanVideo's
# pipelines' spacing), where "euler" leaves the spacing to diffusers' scheduler (1 to its shifted sigma_min)
SCHEDULERS = ("unipc", "euler", "euler_linear")


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
        from .tiny import bundled_transformer, is_tiny, resolve_experts

        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        check_offload(offload, device)
        vae_tiling = VaeTiling.parse(vae_tiling)
        if is_tiny(model) and cache_root is None:
            raise ValueError(f"the embedded {str(model)!r} model needs a cache_root to build it in")
        path, adapters = resolve_experts(model, (adapter, adapter_2), cache_root)
        transformer_file = transformer_file if transformer_file is not None else bundled_transformer(model, path)
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
                                 first_frame=config.task in ("i2v", "ti2v"),
                                 first_frame_optional=config.condition_optional, experts=len(experts),
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
        checkpoint's own ``FlowMatchEulerDiscreteScheduler`` where it ships one (HunyuanVideo), else a default one
        (``"euler_linear"`` too: only its spacing differs, ``set_timesteps``); ``"unipc"`` Wan's UniPC over flow
        sigmas. Each with ``shift``."""
        from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

        config = self.scheduler_config
        if self.scheduler in ("euler", "euler_linear"):
            own = config.get("_class_name") == "FlowMatchEulerDiscreteScheduler"
            return FlowMatchEulerDiscreteScheduler.from_config({**(config if own else {"num_train_timesteps": 1000}),
                                                                "shift": shift})
        base = config if config.get("_class_name") == "UniPCMultistepScheduler" else {}
        return UniPCMultistepScheduler.from_config(
            {**base, "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": shift}
        )

    def set_timesteps(self, scheduler, steps: int) -> None:
        """The request's ``steps`` timesteps on ``scheduler``: an MMDiT, and ``"euler_linear"`` (Stand-In's sampler),
        take sigmas from 1 down to 1/steps before the shift (HunyuanVideo's pipelines, DiffSynth's
        FlowMatchScheduler); Wan's pipelines leave the spacing to the scheduler."""
        if family_of(self.config).explicit_sigmas or self.scheduler == "euler_linear":
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], device=self.device)
        else:
            scheduler.set_timesteps(steps, device=self.device)

    def latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel mean and std as [1, C, 1, 1, 1] float32 on the device."""
        shape = (1, self.latent_channels, 1, 1, 1)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.float32, device=self.device).view(shape)  # noqa: E731
        return as_tensor(self.latents_mean), as_tensor(self.latents_std)


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
