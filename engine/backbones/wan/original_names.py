"""Original Wan key names (``blocks.0.self_attn.q.weight``, ``head.modulation``, ...) for a diffusers
``WanTransformer3DModel`` state dict, as a single-file Wan checkpoint holds them: what the embedded
``tiny-phantom`` writes its transformer shards in (Phantom-Wan ships the original names), and the test data of
the single-file loader.

This is the inverse of the rename table in diffusers' ``convert_wan_transformer_to_diffusers``, read from
that table; ``tests/engine/test_single_file`` checks it by round trip through diffusers' converter, which is the
oracle.
"""
from __future__ import annotations

import re

import torch

# diffusers name -> Wan name, for keys outside the blocks (the converter's table, read right to left)
_TOP_LEVEL = (
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("proj_out.", "head.head."),
    ("scale_shift_table", "head.modulation"),
)
# inside ``blocks.N.``: applied in this order to the rest of the name
_IN_BLOCK = (
    ("attn1.", "self_attn."),
    ("attn2.", "cross_attn."),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".add_k_proj.", ".k_img."),
    (".add_v_proj.", ".v_img."),
    (".norm_added_k.", ".norm_k_img."),
    ("ffn.net.0.proj.", "ffn.0."),
    ("ffn.net.2.", "ffn.2."),
    ("scale_shift_table", "modulation"),
)
# diffusers' block norm2 is Wan's norm3 (the cross-attention norm) and the other way round
_NORM_SWAP = {"norm2.": "norm3.", "norm3.": "norm2."}


def to_original_wan(diffusers_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under the original Wan names (the tensors themselves are not copied)."""
    return {_original_name(key): value for key, value in diffusers_state.items()}


def _original_name(key: str) -> str:
    block = re.match(r"blocks\.\d+\.", key)
    if block is None:
        for new, old in _TOP_LEVEL:
            if key.startswith(new):
                return old + key[len(new):]
        return key  # patch_embedding.* is named the same in both
    head, rest = block.group(0), key[block.end():]
    for new, old in _NORM_SWAP.items():
        if rest.startswith(new):
            return head + old + rest[len(new):]
    for new, old in _IN_BLOCK:
        rest = rest.replace(new, old)
    return head + rest
