"""The served process tree holds the denoiser's weights once after a request (the issue: each model loaded the whole
pipeline), counted with PSS so that a page shared by several processes (a mapped weight file) counts once."""
from __future__ import annotations

import pytest

from benchmarks.server_memory import measure
from engine.tiny import TINY_VERSION
from tests.server.conftest import _tritonserver_available


@pytest.mark.serial
def test_the_server_tree_holds_one_copy_of_the_denoiser_after_a_request(tiny_cache, tmp_path):
    reason = _tritonserver_available()
    if reason:
        pytest.skip(reason)
    row = measure(tiny_cache / TINY_VERSION, tmp_path)
    print(f"\nserver tree after one request: PSS tiny {row['pss_tiny_mb']:.0f} MiB, CPU-sized "
          f"{row['pss_cpu_sized_mb']:.0f} MiB; RSS tiny {row['rss_tiny_mb']:.0f} MiB, CPU-sized "
          f"{row['rss_cpu_sized_mb']:.0f} MiB; denoiser weights {row['denoiser_weight_mb']:.0f} MiB: "
          f"{row['copies']:.2f} copies (PSS), {row['rss_copies']:.2f} (RSS)")
    # a checkpoint where a second copy would show (~44 M parameters: the reference stream shares them, ref_weights)
    assert row["denoiser_weight_mb"] > 150
    assert row["copies"] <= 1.1, f"the served tree holds {row['copies']:.2f} copies of the denoiser's weights"
