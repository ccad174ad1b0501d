"""Wan's encoders and VAE as served parts: umT5 (``TextEncoder``), CLIP (``ImageEncoder``, Wan2.1-I2V) and
``AutoencoderKLWan`` (``Vae``, with tiling), each loading one sub-folder of the checkpoint."""
from __future__ import annotations

import html
import re

import numpy as np
import torch

from ...checkpoint import Checkpoint, component_folder
from ...files import quiet_hub_progress


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
        if self.checkpoint.config.condition_optional:  # TI2V: the first frame alone, replacing latent frame 0
            latent = self._encode(pixels)  # [1, C, 1, h, w]
            frames = (num_frames - 1) // self.checkpoint.vae_scale_temporal + 1
            condition = latent.new_zeros(1, 1 + latent.shape[1], frames, *latent.shape[-2:])
            condition[:, 0, 0] = torch.as_tensor(known, dtype=latent.dtype, device=latent.device)
            condition[:, 1:, :1] = latent
            return condition
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
