"""How many copies of the denoiser's weights the served process tree holds.

    python -m benchmarks.server_memory [--out out/benchmarks] [--cache-dir DIR]

Builds a CPU-sized checkpoint (the tiny checkpoint's encoders and VAE, a denoiser of a few hundred MB),
starts the real ``tritonserver`` on it and on ``tiny``, and reports the resident memory of each whole
process tree (tritonserver and its python-backend stubs) once ready:
``copies = (RSS(cpu-sized) - RSS(tiny)) / denoiser weight bytes in memory``. One copy plus runtime is the goal.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

# a Wan2.1-I2V-shaped denoiser of ~44 M parameters (once in memory: the reference stream shares them by default;
# x2 with ref_weights=merged)
CPU_SIZED = dict(num_attention_heads=12, attention_head_dim=64, ffn_dim=3072, num_layers=4)


def build_cpu_sized(tiny: Path, dest: Path) -> Path:
    """``dest``: the tiny checkpoint with its transformer replaced by a ``CPU_SIZED`` one (random, seeded)."""
    import torch
    from diffusers import WanTransformer3DModel

    from engine.tiny import TRANSFORMER_CONFIG

    if (dest / "model_index.json").is_file():
        return dest
    shutil.copytree(tiny, dest, ignore=shutil.ignore_patterns("transformer", "adapter"))
    config = {**TRANSFORMER_CONFIG, **CPU_SIZED}
    config["added_kv_proj_dim"] = config["num_attention_heads"] * config["attention_head_dim"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        WanTransformer3DModel(**config).save_pretrained(dest / "transformer", safe_serialization=True,
                                                         max_shard_size="100MB")
    return dest


def tree_rss(pid: int) -> int:
    """Resident bytes of process ``pid`` and every process below it."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def served_rss(model: Path, settle_s: float = 3.0) -> int:
    """Process-tree RSS of ``tritonserver`` serving ``model`` (CPU), once every model is ready."""
    from server.launcher import ServeConfig, Server, free_ports
    from server.repository import RepositoryOptions

    grpc, http, metrics = free_ports(3)
    config = ServeConfig(grpc_port=grpc, http_port=http, metrics_port=metrics)
    with Server(RepositoryOptions(model=str(model), adapter=None, device="cpu"), config) as server:
        time.sleep(settle_s)  # let the stubs finish their start-up allocations
        return tree_rss(server.process.pid)


def denoiser_bytes(model: Path) -> int:
    """Bytes of the denoiser's weights as the engine holds them (reference stream included)."""
    import torch

    from engine.components import Checkpoint, Denoiser

    return Denoiser(Checkpoint.load(model, None, dtype=torch.float32)).weight_bytes()


def measure(tiny: Path, work: Path) -> dict:
    big = build_cpu_sized(tiny, work / "cpu-sized")
    weights = denoiser_bytes(big)
    rss_tiny, rss_big = served_rss(tiny), served_rss(big)
    return {"denoiser_weight_mb": weights / 2**20, "rss_tiny_mb": rss_tiny / 2**20, "rss_cpu_sized_mb": rss_big / 2**20,
            "copies": (rss_big - rss_tiny) / weights}


def main(argv: list[str] | None = None) -> int:
    import os

    from engine.tiny import default_cache_root, ensure_tiny

    from .common import write_results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/benchmarks"))
    parser.add_argument("--cache-dir", type=Path, default=default_cache_root(os.environ))
    args = parser.parse_args(argv)
    tiny = ensure_tiny(args.cache_dir)
    row = measure(tiny, args.cache_dir)
    print(write_results("server_memory", [row], [("denoiser_weight_mb", "denoiser weights (MB)"),
                                                 ("rss_tiny_mb", "tree RSS, tiny (MB)"),
                                                 ("rss_cpu_sized_mb", "tree RSS, CPU-sized (MB)"),
                                                 ("copies", "copies of the weights")],
                        args.out, {"cpu_sized": CPU_SIZED}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
