"""``mvgen bench server`` against the real tritonserver (``mvgen serve`` on tiny, loopback): latencies, throughput
and the denoiser's share from Triton's own metrics."""
from __future__ import annotations

import json

import pytest

from mvgen.cli import main

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (pip install 'mvgen[server]')")


def _no_tritonserver() -> str | None:
    from server.launcher import LaunchError, find_tritonserver

    try:
        find_tritonserver()
    except LaunchError as error:
        return str(error)
    return None


def test_tiny_server_at_concurrency_1_and_2(tiny_cache, tmp_path, capsys):
    reason = _no_tritonserver()
    if reason:
        pytest.skip(reason)
    steps = 2
    assert main(["--cache-dir", str(tiny_cache), "bench", "server", "--concurrency", "1", "2", "--requests", "1",
                 "--steps", str(steps), "--frames", "5", "--size", "32", "--refs", "1", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench_server.json").read_text())
    assert payload["config"]["server_exit_code"] == 0  # stopped cleanly by SIGINT
    rows = payload["rows"]
    assert [row["concurrency"] for row in rows] == [1, 2]
    for row in rows:
        assert len(row["latencies_s"]) == row["requests"] == row["concurrency"]  # at least one per thread
        assert 0 < row["p50_s"] <= row["p95_s"] <= row["p99_s"] and row["throughput_rps"] > 0
        # every step is a denoiser call of its own (cond + uncond batched); the loop may add a cache release
        assert row["denoiser_calls"] >= steps * row["requests"] and row["denoiser_compute_s"] > 0
        assert 0 < row["compute_share"] < 1 and 0 <= row["queue_share"] < 1
        assert row["outside_share"] == pytest.approx(1 - row["compute_share"] - row["queue_share"])
    assert "| 2 | 2 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--concurrency", "0", "2"], "--concurrency takes positive numbers"),
    (["--requests", "0"], "--requests must be >= 1"),
    (["--frames", "4"], "--frames must be 4k + 1"),
])
def test_bad_arguments_are_one_line_usage_errors(tmp_path, capsys, argv, words):
    assert main(["bench", "server", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mvgen: error: ") and err.count("\n") == 1 and words in err, err
