"""`mvgen bench mmdit` at the tiny size: parity checked before timing, one row per case, the one results format."""
from __future__ import annotations

import pytest

import json
import subprocess
import sys


@pytest.mark.slow
def test_bench_mmdit_writes_checked_rows(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_mmdit", "--config", "tiny", "--refs", "2",
                           "--repeats", "1", "--warmup", "0", "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "mmdit_tiny.json").read_text())
    rows = {row["case"]: row for row in result["rows"]}
    assert set(rows) == {"R = 0", "R = 2, shared/full", "R = 2, decoupled/isolated (served modes)"}
    for case in ("R = 0", "R = 2, shared/full"):
        assert rows[case]["parity"] < 1e-4 and rows[case]["diffusers_ms"] > 0 and rows[case]["engine_ms"] > 0
    assert rows["R = 2, shared/full"]["ref_tokens"] == 2 * 4 > 0 == rows["R = 0"]["ref_tokens"]
    assert "engine / diffusers" in (tmp_path / "mmdit_tiny.md").read_text()
