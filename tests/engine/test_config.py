"""``MvgenConfig`` from a checkpoint's JSON files: values of the wrong type are refused naming the file and
the key, before ``__post_init__`` or the model trip over them."""
from __future__ import annotations

import json

import pytest

from engine.config import MvgenConfig
from engine.errors import CheckpointError

WAN = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=24, in_channels=36, out_channels=16,
           text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, image_dim=20, added_kv_proj_dim=48, eps=1e-6)


def _files(tmp_path, wan: dict, mvgen: dict | None = None):
    transformer = tmp_path / "config.json"
    transformer.write_text(json.dumps(wan))
    extra = tmp_path / "mvgen_config.json"
    if mvgen is not None:
        extra.write_text(json.dumps(mvgen))
    return transformer, extra


def test_sound_files_give_the_config(tmp_path):
    config = MvgenConfig.from_files(*_files(tmp_path, WAN, {"view_logit_scales": [1, 0.5, 0.25], "lora_alpha": 64}))
    assert config.patch_size == (1, 2, 2) and config.view_logit_scales == (1, 0.5, 0.25) and config.num_layers == 2


@pytest.mark.parametrize("in_wan, changes, words", [
    (True, {"num_layers": "two"}, "num_layers must be int, got 'two'"),
    (True, {"patch_size": 2}, "patch_size must be tuple[int, int, int], got 2"),
    (True, {"patch_size": [1, 2]}, "patch_size must be tuple[int, int, int], got [1, 2]"),
    (True, {"cross_attn_norm": "yes"}, "cross_attn_norm must be bool, got 'yes'"),
    (True, {"eps": None}, "eps must be float, got None"),
    (False, {"max_references": "3"}, "max_references must be int, got '3'"),
    (False, {"view_logit_scales": 5}, "view_logit_scales must be tuple[float, ...] | None, got 5"),
    (False, {"lora_alpha": True}, "lora_alpha must be float | None, got True"),
])
def test_wrong_types_name_the_file_and_the_key(tmp_path, in_wan, changes, words):
    wan, mvgen = ({**WAN, **changes}, None) if in_wan else (WAN, changes)
    transformer, extra = _files(tmp_path, wan, mvgen)
    with pytest.raises(CheckpointError) as caught:
        MvgenConfig.from_files(transformer, extra)
    assert str(caught.value) == f"{transformer if in_wan else extra}: {words}"


def test_overrides_of_the_wrong_type_are_refused(tmp_path):
    with pytest.raises(ValueError, match="^max_references must be int, got 'three'$"):
        MvgenConfig.from_files(*_files(tmp_path, WAN), max_references="three")
