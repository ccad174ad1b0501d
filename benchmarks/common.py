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
