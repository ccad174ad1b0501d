"""``mvgen bench server`` against the real tritonserver (``mvgen serve`` on tiny, loopback): a lone request served
vs the same request through the Python API in process (bit-identical, their latency ratio), a mixed level against
its solo throughput, and the denoiser's share from Triton's own metrics."""
from __future__ import annotations

import json

import pytest

from mvgen.cli import main

# it starts a real tritonserver and times it against the in-process pipeline
pytestmark = [pytest.mark.server, pytest.mark.serial]

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (pip install 'mvgen[server]')")


def _no_tritonserver() -> str | None:
    from server.launcher import LaunchError, find_tritonserver

    try:
        find_tritonserver()
    except LaunchError as error:
        return str(error)
    return None


def test_tiny_served_vs_in_process_and_a_mixed_level(tiny_cache, tmp_path, capsys):
    reason = _no_tritonserver()
    if reason:
        pytest.skip(reason)
    steps = 2
    assert main(["--cache-dir", str(tiny_cache), "bench", "server", "--concurrency", "1", "2", "--requests", "1",
                 "--repeats", "1", "--warmup", "1", "--steps", str(steps), "--frames", "5", "--size", "32",
                 "--refs", "1", "--device", "cpu", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench_server.json").read_text())
    assert {"machine", "revision", "config", "rows"} <= set(payload)
    assert payload["config"]["server_exit_code"] == 0  # stopped cleanly by SIGINT
    assert set(payload["config"]["shapes"]) == {"base", "short", "wide"}
    base, solo, level = payload["rows"]
    assert [(r["kind"], r["concurrency"], r["requests"]) for r in (base, solo, level)] == [
        ("base", 1, 1), ("solo", 1, 3), ("level", 2, 3)]  # a level holds whole mixes: 1 request -> 3
    # the lone request: the same video as the Python API in this process, and its cost relative to it
    assert base["served_equals_in_process"] is True and base["served_max_abs_diff"] == 0
    assert len(base["in_process_latencies_s"]) == 1 and base["in_process_p50_s"] > 0
    assert base["served_over_in_process"] == pytest.approx(base["p50_s"] / base["in_process_p50_s"])
    assert base["served_over_in_process"] > 0 and base["in_process_threads"] >= 1
    assert [s["shape"] for s in level["samples"]] == ["base", "short", "wide"]
    assert len({s["seed"] for s in solo["samples"] + level["samples"]}) == 6  # every request its own seed
    assert level["vs_solo"] == pytest.approx(level["throughput_rps"] / solo["throughput_rps"])
    assert level["beats_solo"] == (level["vs_solo"] >= 1)
    for row in (base, solo, level):
        assert len(row["latencies_s"]) == row["requests"]
        assert 0 < row["p50_s"] <= row["p95_s"] <= row["p99_s"] and row["throughput_rps"] > 0
        # every step is a denoiser call of its own (cond + uncond batched); the loop may add a cache release
        assert row["denoiser_calls"] >= steps * row["requests"] and row["denoiser_compute_s"] > 0
        assert 0 < row["compute_share"] < 1 and 0 <= row["queue_share"] < 1
        assert row["outside_share"] == pytest.approx(1 - row["compute_share"] - row["queue_share"])
        # the loop's queue gauge and the bytes it sends the denoiser (None from a server without those metrics)
        assert {"loop_queue", "loop_queue_peak", "denoiser_input_bytes", "input_bytes_per_call"} <= set(row)
        assert row["input_bytes_per_call"] is None or row["input_bytes_per_call"] > 0
    out = capsys.readouterr().out
    assert "| 1 | base: 5f 32x32 R1 | 1 |" in out and "| 2 | base, short, wide | 3 |" in out


def test_optional_server_metrics_per_row():
    """The loop-queue and BLS-bytes metrics are read where the server has them: summed over labels, buckets left
    out; a row's bytes per denoiser call from their change; None where a server lacks them."""
    from benchmarks.bench_server import optional_fields, parse_metrics

    page = """# HELP nv_inference_exec_count ...
nv_inference_exec_count{model="mvgen_denoiser",version="1"} 7
nv_inference_exec_count{model="mvgen_vae",version="1"} 99
nv_inference_queue_duration_us{model="mvgen_denoiser_2",version="1"} 250
mvgen_loop_queue_requests{model="mvgen"} 2
mvgen_loop_queue_requests{model="mvgen_stream"} 1
mvgen_loop_queue_wait_seconds_bucket{model="mvgen",le="0.1"} 5
mvgen_loop_queue_wait_seconds_sum{model="mvgen"} 0.5
mvgen_denoiser_input_bytes_total{model="mvgen"} 4000
mvgen_denoiser_calls_total{model="mvgen"} 4
"""
    triton, optional = parse_metrics(page)
    assert triton["executions"] == 7 and triton["queue_us"] == 250 and triton["compute_us"] == 0
    assert optional == {"mvgen_loop_queue_requests": 3, "mvgen_loop_queue_wait_seconds_sum": 0.5,
                        "mvgen_denoiser_input_bytes_total": 4000, "mvgen_denoiser_calls_total": 4}
    after = {**optional, "mvgen_loop_queue_requests": 0, "mvgen_denoiser_input_bytes_total": 10000,
             "mvgen_denoiser_calls_total": 7}
    row = optional_fields(optional, after, {"mvgen_loop_queue_requests": 5, "mvgen_loop_queue_wait_seconds_sum": 0.5})
    assert row["loop_queue"]["mvgen_loop_queue_requests"] == {"change": -3, "peak": 5} and row["loop_queue_peak"] == 5
    assert row["denoiser_input_bytes"] == 6000 and row["denoiser_bls_calls"] == 3
    assert row["input_bytes_per_call"] == 2000
    assert optional_fields({}, {}, {}) == {"loop_queue": None, "loop_queue_peak": None, "denoiser_input_bytes": None,
                                           "denoiser_bls_calls": None, "input_bytes_per_call": None}


@pytest.mark.parametrize("argv, words", [
    (["--concurrency", "0", "2"], "--concurrency takes positive numbers"),
    (["--requests", "0"], "--requests must be >= 1"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--frames", "4"], "--frames must be 4k + 1"),
])
def test_bad_arguments_are_one_line_usage_errors(tmp_path, capsys, argv, words):
    assert main(["bench", "server", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mvgen: error: ") and err.count("\n") == 1 and words in err, err
