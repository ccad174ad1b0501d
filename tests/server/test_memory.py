"""The served process tree holds the denoiser's weights once (the issue: each model loaded the whole pipeline)."""
from __future__ import annotations

import pytest

from benchmarks.server_memory import measure
from engine.tiny import TINY_VERSION
from tests.server.conftest import _tritonserver_available


def test_the_server_tree_holds_one_copy_of_the_denoiser(tiny_cache, tmp_path):
    reason = _tritonserver_available()
    if reason:
        pytest.skip(reason)
    row = measure(tiny_cache / TINY_VERSION, tmp_path)
    print(f"\nserver tree RSS: tiny {row['rss_tiny_mb']:.0f} MiB, CPU-sized {row['rss_cpu_sized_mb']:.0f} MiB, "
          f"denoiser weights {row['denoiser_weight_mb']:.0f} MiB: {row['copies']:.2f} copies")
    # a checkpoint where a second copy would show (~44 M parameters: the reference stream shares them, ref_weights)
    assert row["denoiser_weight_mb"] > 150
    assert row["copies"] <= 1.2, f"the served tree holds {row['copies']:.2f} copies of the denoiser's weights"
