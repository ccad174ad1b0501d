"""The MMDiT family's (HunyuanVideo's) text encoders and VAE, with the interfaces of ``engine.checkpoint``' Wan ones.

The prompt goes through diffusers' own ``HunyuanVideoPipeline.encode_prompt`` built on the two text encoders alone
(its template, Llama's third-to-last hidden states cropped to the prompt, CLIP's pooled output), so the text
inputs are diffusers' by construction. The VAE is ``AutoencoderKLHunyuanVideo`` in float32, its latents scaled by
its one ``scaling_factor`` as HunyuanVideo's pipelines scale them.
"""
from __future__ import annotations

import numpy as np
import torch

from ...checkpoint import Checkpoint, component_folder
from ..wan.components import Vae
from ...files import quiet_hub_progress

# Llama-3's chat header tokens: diffusers' fixed crop of the prompt template (95) counts Llama-3's tokens
LLAMA3_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def prompt_template(tokenizer) -> dict:
    """HunyuanVideo's prompt template and where its Llama states are cropped. Its fixed ``crop_start`` (95) counts
    Llama-3's tokens of the template before the prompt (BOS included). Under another tokenizer the crop is counted
    the same way, with that tokenizer: the template's tokens before ``{}`` (plus its BOS, if it adds one). Not
    diffusers' fallback (the template's token count less two), which assumes Llama-3's tokens: under a byte
    tokenizer it cuts eleven bytes into the text, so an empty negative prompt would keep no token at all and the
    token refiner's masked mean would divide by zero."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    vocab = tokenizer.get_vocab()
    if all(token in vocab for token in LLAMA3_TOKENS):
        return dict(DEFAULT_PROMPT_TEMPLATE)
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    prefix = template.split("{}")[0]
    ids = tokenizer(prefix).input_ids
    bos = int(tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id)
    return {"template": template, "crop_start": len(tokenizer(prefix, add_special_tokens=False).input_ids) + bos}


class MMDiTTextEncoder:
    """Llama (``text_encoder/``, ``tokenizer/``) and CLIP text (``text_encoder_2/``, ``tokenizer_2/``) in the
    checkpoint's dtype, through diffusers' ``HunyuanVideoPipeline.encode_prompt``."""

    def __init__(self, checkpoint: Checkpoint):
        from diffusers import HunyuanVideoPipeline
        from transformers import AutoTokenizer, CLIPTextModel, LlamaModel

        from ...loading import read_checkpoint_json
        from ...errors import CheckpointError

        self.checkpoint = checkpoint
        folder = component_folder(checkpoint, "text_encoder")
        if read_checkpoint_json(folder / "config.json", "text encoder config").get("model_type") == "llava":
            raise CheckpointError(f"{folder}: HunyuanVideo-I2V's Llava text encoder (the prompt read together with "
                                  "the image's tokens) is not served; the MMDiT takes a Llama text encoder")
        device, dtype = checkpoint.device, checkpoint.dtype
        with quiet_hub_progress():
            tokenizer = AutoTokenizer.from_pretrained(component_folder(checkpoint, "tokenizer", weights=False))
            tokenizer_2 = AutoTokenizer.from_pretrained(component_folder(checkpoint, "tokenizer_2", weights=False))
            llama = LlamaModel.from_pretrained(folder, dtype=dtype).to(device).eval()
            clip = CLIPTextModel.from_pretrained(component_folder(checkpoint, "text_encoder_2"), dtype=dtype)
            clip = clip.to(device).eval()
        # the pipeline holds the text encoders only: encode_prompt reads nothing else
        self.pipeline = HunyuanVideoPipeline(text_encoder=llama, tokenizer=tokenizer, transformer=None, vae=None,
                                             scheduler=None, text_encoder_2=clip, tokenizer_2=tokenizer_2)
        self.template = prompt_template(tokenizer)

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """N prompts -> ``text`` [N, 256, text_dim] (Llama states after the template, cropped; padding rows as
        Llama leaves them), ``text_mask`` [N, 256] float32 (1 = a token of the prompt) and ``pooled_text``
        [N, pooled_projection_dim] (CLIP's pooled output), in the checkpoint's dtype but the mask."""
        ckpt = self.checkpoint
        text, pooled, mask = self.pipeline.encode_prompt(
            list(texts), prompt_template=self.template, device=ckpt.device, dtype=ckpt.dtype,
            max_sequence_length=ckpt.config.text_len)
        return {"text": text.to(ckpt.dtype), "text_mask": mask.float(), "pooled_text": pooled.to(ckpt.dtype)}


class MMDiTVae(Vae):
    """HunyuanVideo's causal VAE (``vae/``) in float32 with ``Vae``'s interface; latents are ``latent x
    scaling_factor`` (the checkpoint's ``latents_mean``/``latents_std`` say the same as 0 and 1 / scaling_factor,
    which would round differently)."""

    model_class = "AutoencoderKLHunyuanVideo"

    def __init__(self, checkpoint: Checkpoint):
        super().__init__(checkpoint)
        self.scale = float(self.model.config.scaling_factor)

    @torch.no_grad()
    def encode_condition(self, frame: np.ndarray, known: np.ndarray, num_frames: int) -> torch.Tensor:
        """HunyuanVideo-I2V's ``latent_concat`` condition [1, 17, f, h, w]: the latent of the first frame encoded
        alone (a one-frame video, as its ``prepare_latents``) in latent frame 0 and zeros after it, then the mask
        channel: ``known`` [h, w] (1 = known) in frame 0, zeros after it (diffusers' mask is all ones there)."""
        first = self._encode(self._pixels(frame[None])[:, :, None])  # [1, 16, 1, h, w]
        frames = (num_frames - 1) // self.checkpoint.vae_scale_temporal + 1
        latent = first.new_zeros(1, first.shape[1], frames, *first.shape[-2:])
        latent[:, :, :1] = first
        mask = first.new_zeros(1, 1, frames, *first.shape[-2:])
        mask[:, 0, 0] = torch.as_tensor(known, dtype=first.dtype, device=first.device)
        return torch.cat([latent, mask], dim=1)

    def _normalise(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * self.scale

    def _denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scale
