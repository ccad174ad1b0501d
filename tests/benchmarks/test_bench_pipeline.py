"""``mvgen bench pipeline``: the stage timings of a tiny generation add up, and the wrapper changes nothing."""
from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.bench_pipeline import TimedStages
from mvgen.cli import main

SMALL = ["--frames", "5", "--size", "32", "--steps", "2", "--refs", "1", "--repeats", "1", "--warmup", "0"]


def test_tiny_pipeline_phases(tiny_cache, tmp_path, capsys):
    assert main(["--cache-dir", str(tiny_cache), "bench", "pipeline", "--config", "tiny", *SMALL,
                 "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench_pipeline.json").read_text())
    (row,) = payload["rows"]
    assert row["config"] == "tiny" and row["denoiser_calls"] == 2  # one call per step, cond + uncond batched
    (run,) = row["runs"]
    assert set(run["stages"]) == {"encode_text", "encode_image", "encode_condition", "encode_references",
                                  "denoise", "decode"}
    for key in ("text_s", "image_s", "vae_encode_s", "denoise_s", "decode_s", "loop_s", "total_s"):
        assert row[key] > 0, key
    assert row["encode_s"] + row["denoise_s"] + row["decode_s"] <= row["total_s"]
    assert row["denoise_s"] <= row["loop_s"] and 0 < row["denoise_share"] < 1
    assert "| tiny | 5 | 32x32 | 1 | 2 |" in capsys.readouterr().out
    assert main(["bench", "plot", "--results", str(tmp_path)]) == 0
    assert (tmp_path / "pipeline_phases.png").is_file()


def test_timed_stages_pass_everything_through():
    class Stages:
        caches_references = True

        def denoise(self, inputs, cache_key, expert, cache_references=True):
            return inputs * 2

        def release(self, key):
            return f"released {key}"

    timed = TimedStages(Stages(), sync=lambda: None)
    assert timed.denoise(np.ones(2), "k", 0, cache_references=False).tolist() == [2.0, 2.0]
    assert timed.release("k") == "released k" and timed.caches_references is True
    assert list(timed.seconds) == ["denoise"] and len(timed.seconds["denoise"]) == 1


@pytest.mark.parametrize("argv, words", [
    (["--frames", "6"], "--frames must be 4k + 1"),
    (["--size", "40"], "--size must be a positive multiple of 16"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--set", "nokey"], "--set expects KEY=VALUE"),
    (["--config", "huge"], "invalid choice: 'huge'"),
])
def test_bad_arguments_are_one_line_usage_errors(tmp_path, capsys, argv, words):
    assert main(["bench", "pipeline", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mvgen: error: ") and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "bench_pipeline.json").exists()
