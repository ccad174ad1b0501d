"""``mvgen bench denoiser``: the engine and diffusers' Wan (the oracle we did not write) give equal outputs on the
same weights before anything is timed, the results hold every planned row, a mismatch is refused, bad command lines
are one-line errors."""
from __future__ import annotations

import json
from argparse import Namespace

import pytest
import torch

from benchmarks import bench_denoiser, denoiser_worker
from benchmarks.configs import latent_grid
from mvgen.cli import main

TINY = ["--config", "tiny", "--tokens", "48", "--repeats", "1", "--warmup", "0", "--steps", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_run(tiny_cache, tmp_path_factory):
    """One run on tiny with 0 and 1 references (each variant in its own process): (exit code, JSON, Markdown)."""
    out = tmp_path_factory.mktemp("bench-denoiser")
    code = main(["--cache-dir", str(tiny_cache), "bench", "denoiser", *TINY, "--refs", "0", "1", "--out", str(out)])
    return code, json.loads((out / "bench_denoiser.json").read_text()), (out / "bench_denoiser.md").read_text(), out


def test_every_planned_variant_has_a_row(tiny_run):
    code, payload, table, _ = tiny_run
    assert code == 0
    assert {"machine", "revision", "config", "rows"} <= set(payload) and payload["benchmark"] == "bench_denoiser"
    args = Namespace(backend=["auto"], compile=False, step_cache_threshold=0.1)
    fields = bench_denoiser.engine_fields()
    want = {(refs, v.key) for refs in (0, 1) for v in bench_denoiser.plan(refs, args, fields)}
    assert {(row["refs"], row["key"]) for row in payload["rows"]} == want
    assert {"diffusers", "engine-auto", "engine-auto-refcache-off", "engine-auto-refcache-on"} <= {k for _, k in want}
    body = [line for line in table.splitlines() if line.startswith("| tiny |")]
    assert len(body) == len(want) and "peak RSS of the variant's fresh process (MiB)" in table


def test_engine_equals_diffusers_before_timing(tiny_run):
    _, payload, _, _ = tiny_run
    rows = [row for row in payload["rows"] if not row.get("skipped")]
    checked = [row for row in rows if row["parity_oracle"] == "diffusers"]
    assert {row["refs"] for row in checked} == {0, 1}  # R = 0 and the frame-append model
    for row in checked:
        assert row["parity_ok"] and row["parity_rel_err"] < 1e-4, row
    cached = [row for row in rows if row["key"].endswith("refcache-on")]
    assert cached and all(row["parity_rel_err"] < 1e-4 for row in cached)
    for row in rows:
        assert not row.get("failed"), row["note"]
        assert len(row["samples_s"]) == 1 and row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"]
        assert row["memory_kind"] == "peak_rss" and row["peak_mib"] > row["weights_mib"] > 0
        if row["variant"] != "diffusers":
            assert row["ratio"] > 0


def test_rows_describe_the_variant(tiny_run):
    _, payload, _, _ = tiny_run
    rows = {(row["refs"], row["key"]): row for row in payload["rows"]}
    assert rows[(1, "diffusers")]["stream"] == "appended as frames"
    assert rows[(1, "engine-auto-refcache-on")]["ref_cache"] == "on"
    assert rows[(1, "engine-auto-refcache-off")]["ref_cache"] == "off"
    assert rows[(0, "engine-auto")]["ref_cache"] == ""
    assert rows[(0, "engine-auto-step_cache_threshold")]["approximate"] and not rows[(0, "engine-auto")]["approximate"]
    f, h, w = latent_grid(48)
    assert rows[(1, "engine-auto")]["ref_tokens"] == h * w // 4 and rows[(1, "engine-auto")]["video_tokens"] == 48


def test_plot_reads_the_results(tiny_run):
    from PIL import Image

    _, _, _, out = tiny_run
    assert main(["bench", "plot", "--results", str(out)]) == 0
    for name in ("denoiser_step_time.png", "denoiser_ratio.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 100


def _spec(tiny_cache, tmp_path, **changes) -> dict:
    from engine.tiny import ensure_tiny

    spec = {"model_dir": str(ensure_tiny(tiny_cache) / "transformer"), "grid": [3, 8, 8], "refs": 1, "batch": 2,
            "seed": 0, "dtype": "float32", "device": "cpu", "steps": 2, "warmup": 0, "repeats": 1, "engine": True,
            "overrides": dict(bench_denoiser.FRAME_APPEND), "cache": "request", "reference_cache": True,
            "compiled": False, "compile_mode": "default", "report_fields": [], "oracle": None, "tolerance": 1e-4,
            "save_output": None, "threads": None, "result": str(tmp_path / "result.json")}
    return {**spec, **changes}


def test_a_mismatch_is_refused_before_timing(tiny_cache, tmp_path):
    from safetensors.torch import save_file

    want = tmp_path / "want.safetensors"
    save_file({denoiser_worker.OUTPUT_KEY: torch.randn(2, 16, 3, 8, 8, generator=torch.Generator().manual_seed(3))},
              want)
    result = denoiser_worker.run(_spec(tiny_cache, tmp_path, oracle=str(want)))
    assert result["parity_ok"] is False and result["parity_rel_err"] > 0.5
    assert "samples_s" not in result


@pytest.mark.parametrize("argv, words", [
    (["--config", "wan-14b"], "GPU sizes"),
    (["--tokens", "7"], "--tokens 7: no latent grid"),
    (["--backend", "triton"], "--backend triton needs a CUDA device"),
    (["--layers", "2"], "--layers does not apply to tiny"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--refs", "-1"], "--refs takes reference counts >= 0"),
    (["--backend", "flash"], "invalid choice: 'flash'"),
    (["--device", "cuda"], "no CUDA device is available"),
])
def test_bad_arguments_are_one_line_usage_errors(tmp_path, capsys, argv, words):
    if torch.cuda.is_available() and words in ("GPU sizes", "--backend triton needs a CUDA device",
                                               "no CUDA device is available"):
        pytest.skip("a CUDA device is present")
    assert main(["--cache-dir", str(tmp_path / "cache"), "bench", "denoiser", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mvgen: error: ") and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "bench_denoiser.json").exists() and not (tmp_path / "cache").exists()
