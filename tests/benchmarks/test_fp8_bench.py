"""FP8 rows of ``mvgen bench denoiser`` and ``mvgen bench pipeline --fp8-quality``: planned and checked against the
engine in its own dtype, trained-like weights as documented, whole-generation errors against float32 with
bfloat16's beside them."""
from __future__ import annotations

import json
from argparse import Namespace

import pytest
import torch

from benchmarks import bench_denoiser, bench_pipeline
from mvgen.cli import main


def _plan(features=None):
    args = Namespace(backend=["auto"], compile=False, step_cache_threshold=0.1, features=features)
    return {v.key: v for v in bench_denoiser.plan(0, args, bench_denoiser.engine_fields())}


def test_fp8_rows_are_checked_against_the_engine_at_the_fp8_tolerance():
    plan = _plan()
    for key, mode in (("engine-auto-fp8-weight-only", "fp8_weight_only"), ("engine-auto-fp8-gemm", "fp8_gemm")):
        variant = plan[key]
        assert variant.overrides["quantize"] == mode and variant.oracle == "engine-auto"
        assert variant.tolerance == bench_denoiser.FP8_TOLERANCE
    assert plan["engine-auto-context_cache"].oracle == "diffusers" and plan["engine-auto-context_cache"].tolerance is None
    only = _plan(["fp8-gemm"])
    assert set(only) == {"diffusers", "engine-auto", "engine-auto-fp8-gemm"}


def test_trained_like_weights_follow_the_stated_distribution():
    """Row scales over two decades, three outlier input channels, heavy tails, the given weight's RMS."""
    weight = torch.randn(256, 512) * 0.03
    drawn = bench_pipeline.trained_like_weights(weight, torch.Generator().manual_seed(0))
    assert drawn.shape == weight.shape and drawn.dtype == weight.dtype
    w = drawn.double()
    assert w.pow(2).mean().sqrt().item() == pytest.approx(weight.double().pow(2).mean().sqrt().item(), rel=1e-5)
    plain = w.clone()
    columns = w.pow(2).mean(0).sqrt()
    outliers = columns.topk(bench_pipeline.OUTLIER_COLUMNS).indices
    assert (columns[outliers] > 8 * columns.median()).all()
    plain[:, outliers] = 0
    rows = plain.abs().median(1).values
    assert 30 < (rows.max() / rows.min()).item() < 300  # ~ 10 ** ROW_DECADES, trimmed by the sampling
    z = plain / plain.pow(2).mean(1, keepdim=True).sqrt()
    assert z.pow(4).mean().item() > 4  # Student-t with 4 dof: far heavier tails than a normal's kurtosis of 3


@pytest.mark.slow  # six generations, each in a fresh process (~60 s on 2 cores)
def test_fp8_quality_rows_on_tiny(tiny_cache, tmp_path):
    assert main(["--cache-dir", str(tiny_cache), "bench", "pipeline", "--config", "tiny", "--fp8-quality",
                 "--frames", "5", "--size", "32", "--steps", "2", "--refs", "1", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / f"{bench_pipeline.FP8_RESULTS}.json").read_text())
    rows = {row["variant"]: row for row in payload["rows"]}
    assert list(rows) == [label for label, _, _ in bench_pipeline.FP8_VARIANTS]
    reference, bf16 = rows["float32"], rows["bfloat16"]
    assert "latent_rel_err" not in reference
    for label, row in rows.items():
        if row is reference:
            continue
        assert len(row["velocity_rel_err"]) == 2 and 0 < row["latent_rel_err"] < 5e-2, label
        if row["quantize"] != "none":
            assert row["weights_mib"] < reference["weights_mib"] and "fp8" in row["block_weights"]
            assert row["velocity_rel_err_mean"] > bf16["velocity_rel_err_mean"] * 0.9  # FP8 rounds coarser
            assert row["velocity_vs_bf16"] > 0
    assert payload["config"]["weights"] == bench_pipeline.WEIGHT_DISTRIBUTION


def test_fp8_quality_refuses_its_own_options(tmp_path, capsys):
    assert main(["bench", "pipeline", "--fp8-quality", "--quantize", "fp8", "--out", str(tmp_path)]) == 2
    assert "--fp8-quality runs its own variants" in capsys.readouterr().err


def test_step_cache_rows_record_the_quantize_mode(tiny_cache, tmp_path):
    """``mvgen bench steps --quantize fp8`` loads the FP8 denoiser and every row (and the run's config) says so, with
    the compute path its linears took; without the flag the rows say none and 16/32-bit."""
    base = ["--cache-dir", str(tiny_cache), "bench", "steps", "--config", "tiny", "--thresholds", "0.2", "--steps", "2",
            "--frames", "5", "--size", "32", "--refs", "1", "--repeats", "1"]
    for flags, mode, path in ((["--quantize", "fp8"], "fp8", "fp8 weight-only"), ([], "none", "16/32-bit")):
        out = tmp_path / mode
        assert main([*base, *flags, "--out", str(out)]) == 0
        payload = json.loads((out / "step_cache.json").read_text())
        assert payload["config"]["quantize"] == mode and len(payload["rows"]) == 2
        for row in payload["rows"]:
            assert row["quantize"] == mode and row["block_weights"].startswith(path), row
        assert f"| {mode} |" in (out / "step_cache.md").read_text()
