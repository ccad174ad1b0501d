"""One result format for every benchmark: JSON (machine, versions, revision, config, samples) + Markdown."""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    else:
        info["device"] = f"CPU ({_cpu_model()})"
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_call(fn, repeats: int, warmup: int = 2, sync=None) -> list[float]:
    """Wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs, device-synchronised."""
    sync = sync or (torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None))
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return samples


def median(samples) -> float:
    return statistics.median(samples)


def write_results(name: str, rows: list[dict], columns: list[tuple[str, str]], out_dir: Path, config: dict) -> str:
    """Write ``<name>.json`` and ``<name>.md``; return the Markdown table. ``columns``: (key, header)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), "revision": revision(), "config": config, "rows": rows}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2))
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k)) for k, _ in columns) + " |")
    table = "\n".join(lines) + f"\n\nMachine: {payload['machine']['device']}, torch {payload['machine']['torch']}, " \
        f"{payload['machine']['cpu_threads']} threads, revision {payload['revision']}.\n"
    (out_dir / f"{name}.md").write_text(table)
    return table


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def scrape(metrics_url: str, name: str, **labels) -> float:
    """Sum of the Prometheus samples ``name`` whose labels include ``labels`` (a server's ``/metrics``)."""
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
    return total


def peak_rss_bytes() -> int:
    """This process's peak resident set: ``VmHWM`` (this program image only: a process forked from a preloaded
    forkserver starts counting at the fork), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def standalone_main(module, argv=None, cache_dir: bool = False) -> int:
    """``python -m benchmarks.<module>``: the module's ``mvgen bench`` arguments (``add_arguments``) and ``run``;
    ``cache_dir``: it builds models, under ``--cache-dir`` (default ``$MVGEN_CACHE``, read here at the entry point,
    else ~/.cache/mvgen). A ``UsageError`` ends as a usage error."""
    import argparse
    import os

    from engine.errors import UsageError
    from engine.tiny import default_cache_root

    parser = argparse.ArgumentParser(prog=f"python -m {module.__name__}", description=module.HELP)
    if cache_dir:
        parser.add_argument("--cache-dir", type=Path, default=default_cache_root(os.environ),
                            help="where the tiny model and built transformers live (default $MVGEN_CACHE or "
                                 "~/.cache/mvgen)")
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return module.run(args)
    except UsageError as error:
        parser.error(str(error))


def bench_device(name: str) -> str:
    """A benchmark's ``--device``: ``auto`` resolved as the engine does (``engine.checkpoint.resolve_device``), a
    CUDA device refused, naming the flag, where there is none."""
    from engine.errors import UsageError
    from engine.devices import resolve_device

    device = str(resolve_device(name))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available (use --device cpu)")
    return device
