"""Step-invariant work once per request: every block's cross-attention keys and values of the text, CLIP image
and identity states (``precompute_context``) give the same velocity as recomputing them at every call."""
from __future__ import annotations

import pytest
import torch

from engine.config import MvgenConfig
from engine.backbones.wan.model import MultiViewWanTransformer
from engine.runtime.caches import ContextCache

from .conftest import FAMILIES, SMALL_WAN, inputs, rel_err


def _model(family: str, **changes) -> MultiViewWanTransformer:
    torch.manual_seed(3)
    model = MultiViewWanTransformer(MvgenConfig.from_dict({**SMALL_WAN, **FAMILIES[family]}, **changes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("changes, refs, cached", [
    ({}, 0, False), ({}, 2, False), (dict(ref_mode="token_concat"), 2, False),
    (dict(ref_attention="isolated", ref_timestep="zero"), 2, True),
    (dict(ref_attention="prototype"), 2, False), (dict(ref_attention="prototype", ref_timestep="zero"), 2, True),
])
def test_cached_context_equals_recomputing(family, changes, refs, cached):
    model = _model(family, **changes)
    gen = torch.Generator().manual_seed(len(family) + refs)
    x = inputs(gen, frames=2, height=6, width=10, refs=refs, config=model.config)
    if model.prototype is not None:  # ProFashion PPA: rendered poses of the frames and the references
        x["frame_pose"] = torch.rand(2, 2, 3, 6, 10, generator=gen) * 2 - 1
        x["ref_pose"] = torch.rand(2, refs, 3, 6, 10, generator=gen) * 2 - 1
    with torch.no_grad():
        want = model(**x)
        context = model.precompute_context(x["text"], x["image_context"])
        ref_cache = None
        if cached:
            ref_cache = model.precompute_reference(x["ref_latents"], x["text"], x["image_context"], (2, 6, 10))
        poisoned = dict(x, text=torch.full_like(x["text"], float("nan")), ref_latents=None if cached else x["ref_latents"])
        got = model(**poisoned, ref_cache=ref_cache, context_cache=context)
    assert (context.reference is None) == (model.ref_blocks is None)
    assert rel_err(got, want) < 1e-6


def test_identity_context():
    model = _model("wan21_i2v", identity=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "identity" in name and "gate" in name:
                p.fill_(0.7)  # open the zero-initialised gate: the identity branch must count
    gen = torch.Generator().manual_seed(11)
    x = inputs(gen, frames=2, height=6, width=10, refs=1, config=model.config)
    identity = torch.randn(2, 257, SMALL_WAN["image_dim"], generator=gen)
    with torch.no_grad():
        want = model(**x, identity_context=identity)
        context = model.precompute_context(x["text"], x["image_context"], identity)
        got = model(**x, identity_context=identity, context_cache=context)
        without = model(**x)
    assert context.video[0].identity is not None and context.reference[0].identity is None
    assert rel_err(got, want) < 1e-6 and rel_err(without, want) > 1e-4


def test_batches_of_caches_stack_and_refuse_other_rows():
    model = _model("wan21_i2v")
    gen = torch.Generator().manual_seed(5)
    a, b = (inputs(gen, batch=n, frames=1, height=4, width=4, refs=1, config=model.config) for n in (2, 1))
    with torch.no_grad():
        joined = ContextCache.cat([model.precompute_context(a["text"], a["image_context"]),
                                   model.precompute_context(b["text"], b["image_context"])], pad_to=4)
        whole = {k: torch.cat([a[k], b[k], a[k][:1]]) for k in a}
        assert joined.rows == 4
        assert rel_err(model(**whole, context_cache=joined), model(**whole)) < 1e-6
        with pytest.raises(ValueError, match="context cache holds 4 rows, this call has 2"):
            model(**a, context_cache=joined)
