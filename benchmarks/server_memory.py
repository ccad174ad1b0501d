"""How many copies of the denoiser's weights the served process tree holds, after one request.

    python -m benchmarks.server_memory [--out out/benchmarks] [--cache-dir DIR]

Builds a CPU-sized checkpoint (the tiny checkpoint's encoders and VAE, a denoiser of a few hundred MB),
starts the real ``tritonserver`` on it and on ``tiny`` (each model warmed up at load, ``engine.warmup``), sends
each one default request, then reads the memory of each whole process tree (tritonserver and its python-backend
stubs): PSS (proportional set size, ``/proc/PID/smaps_rollup``: a page shared by several processes, such as a
mapped weight file, counted once over them) and RSS (shared pages counted in every process).
``copies = (PSS(cpu-sized) - PSS(tiny)) / denoiser weight bytes in memory``: one copy plus runtime is the goal.
Measured after a request, not at ready: safetensors weights are mapped lazily, so at ready a model that did not
warm up holds part of them (``shared/ENVIRONMENT.md``, 2026-12-07).
"""
from __future__ import annotations

import argparse
import re
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


def tree_pss(pid: int) -> int:
    """Proportional set size of process ``pid`` and every process below it, bytes (``smaps_rollup``'s Pss)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            text = Path(f"/proc/{proc.pid}/smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(re.search(r"^Pss:\s+(\d+) kB", text, re.M).group(1)) << 10
    return total


# "mvgen_vae: warm-up full of the VAE: ...; 0.62 s" (server.models' log line per model)
WARMUP_LINE = re.compile(r'"(\w+): warm-up \w+ of .*; ([\d.]+) s"')


def default_inputs():
    """The default request with every image it may carry: the demo's first frame and 3 reference views (pixels)."""
    import numpy as np

    from engine.demo_inputs import first_frame, reference
    from server.client import GenerationInputs

    return GenerationInputs(prompt="a person turns around, showing the back of the jacket",
                            first_frame=np.asarray(first_frame()[0]),
                            references=[np.asarray(reference(view)) for view in ("front", "back", "side")])


def served_memory(model: Path, warmup: str = "full", settle_s: float = 2.0) -> dict:
    """Process-tree PSS and RSS (bytes) of ``tritonserver`` serving ``model`` (CPU) after one default request, and
    each model's warm-up seconds from the server log."""
    from server.client import generate
    from server.launcher import ServeConfig, Server, free_ports
    from server.repository import RepositoryOptions

    grpc, http, metrics = free_ports(3)
    config = ServeConfig(grpc_port=grpc, http_port=http, metrics_port=metrics)
    options = RepositoryOptions(model=str(model), adapter=None, device="cpu", pad_batch_to=0, warmup=warmup)
    with Server(options, config) as server:
        generate(server.grpc_url, default_inputs())
        time.sleep(settle_s)  # let the stubs return what the request freed
        warm = {name: float(seconds) for name, seconds in WARMUP_LINE.findall(server.log_path.read_text())}
        return {"pss": tree_pss(server.process.pid), "rss": tree_rss(server.process.pid), "warmup_s": warm}


def denoiser_bytes(model: Path) -> int:
    """Bytes of the denoiser's weights as the engine holds them (reference stream included)."""
    import torch

    from engine.checkpoint import Checkpoint
    from engine.runtime.denoiser import Denoiser

    return Denoiser(Checkpoint.load(model, None, dtype=torch.float32)).weight_bytes()


def measure(tiny: Path, work: Path, warmup: str = "full") -> dict:
    big = build_cpu_sized(tiny, work / "cpu-sized")
    weights = denoiser_bytes(big)
    small, large = served_memory(tiny, warmup), served_memory(big, warmup)
    mib = 2**20
    return {"denoiser_weight_mb": weights / mib, "pss_tiny_mb": small["pss"] / mib,
            "pss_cpu_sized_mb": large["pss"] / mib, "copies": (large["pss"] - small["pss"]) / weights,
            "rss_tiny_mb": small["rss"] / mib, "rss_cpu_sized_mb": large["rss"] / mib,
            "rss_copies": (large["rss"] - small["rss"]) / weights,
            "warmup_s_tiny": small["warmup_s"], "warmup_s_cpu_sized": large["warmup_s"]}


def main(argv: list[str] | None = None) -> int:
    import os

    from engine.tiny import default_cache_root, ensure_tiny
    from engine.warmup import WARMUP_MODES

    from .common import write_results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/benchmarks"))
    parser.add_argument("--cache-dir", type=Path, default=default_cache_root(os.environ))
    parser.add_argument("--warmup", choices=WARMUP_MODES, default="full", help="the served models' warm-up at load")
    args = parser.parse_args(argv)
    tiny = ensure_tiny(args.cache_dir)
    row = measure(tiny, args.cache_dir, args.warmup)
    print(write_results("server_memory", [row], [("denoiser_weight_mb", "denoiser weights (MiB)"),
                                                 ("pss_tiny_mb", "tree PSS, tiny (MiB)"),
                                                 ("pss_cpu_sized_mb", "tree PSS, CPU-sized (MiB)"),
                                                 ("copies", "copies of the weights (PSS)"),
                                                 ("rss_tiny_mb", "tree RSS, tiny (MiB)"),
                                                 ("rss_cpu_sized_mb", "tree RSS, CPU-sized (MiB)"),
                                                 ("rss_copies", "copies (RSS)")],
                        args.out, {"cpu_sized": CPU_SIZED, "measured": "after one default request",
                                   "warmup": args.warmup, "pad_batch_to": 0}))
    for name in ("tiny", "cpu_sized"):
        print(f"warm-up seconds, {name}: " + ", ".join(f"{model} {seconds:.2f}"
                                                        for model, seconds in sorted(row[f"warmup_s_{name}"].items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
