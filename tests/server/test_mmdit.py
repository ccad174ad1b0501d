"""The MMDiT (HunyuanVideo layout, MVI2V's triple stream) from `mvgen generate`, the Python API and the real
tritonserver: the same video, bit for bit, with references and without; bad input refused in one line."""
from __future__ import annotations

import numpy as np
import pytest

from engine.media import contact_sheet
from tests.server.conftest import CACHEABLE, SMALL, _serve, png
from tests.server.test_wan_family import OVERRIDES, _cli, _served

PROMPT = "the person of the references turns around"


@pytest.fixture(scope="module")
def served_mmdit(stopping, tiny_cache, tmp_path_factory):
    """tiny-mmdit with an isolated, zero-timestep reference stream (``_cli``'s flags): the isolated mask through the
    three-stream attention (the full one is checked in process against diffusers, tests/engine/test_mmdit.py)."""
    yield from _serve(stopping, tiny_cache, tmp_path_factory.mktemp("served-mmdit"), *CACHEABLE, model="tiny-mmdit")


@pytest.mark.parametrize("num_refs", [0, 2])
def test_mmdit_is_the_same_everywhere(served_mmdit, images, tiny_cache, tmp_path, num_refs):
    from engine.pipeline import MultiViewPipeline

    first, refs = images
    values = dict(prompt=PROMPT, first_frame=first, references=refs[:num_refs], **SMALL)
    api = MultiViewPipeline.from_pretrained("tiny-mmdit", cache_root=tiny_cache, dtype="float32", **OVERRIDES)(
        **values)
    assert api.shape == (SMALL["num_frames"], SMALL["height"], SMALL["width"], 3)
    assert api.std() > 10  # a real picture, not a saturated one (NaN latents decode to black)
    served = _served(served_mmdit, values)
    assert np.array_equal(served, api), "server vs API"
    command_values = {k: v for k, v in values.items() if not (k == "references" and not v)}
    cli = _cli("tiny-mmdit", tiny_cache, tmp_path, command_values)
    assert np.array_equal(cli, contact_sheet(api)), "CLI vs API"


def test_mmdit_refs_change_the_video_and_bad_input_is_refused(served_mmdit, images):
    from server.client import ClientError, GenerationInputs, generate

    first, refs = images
    base = dict(prompt=PROMPT, first_frame=png(first), **SMALL)
    without = generate(served_mmdit.url, GenerationInputs(**base))
    with_refs = generate(served_mmdit.url, GenerationInputs(**base, references=[png(r) for r in refs[:2]]))
    assert not np.array_equal(without, with_refs)
    with pytest.raises(ClientError, match="first"):  # an I2V model needs its first frame
        generate(served_mmdit.url, GenerationInputs(prompt=PROMPT, **SMALL))
    again = generate(served_mmdit.url, GenerationInputs(**base))  # the server stays up and deterministic
    assert np.array_equal(again, without)
