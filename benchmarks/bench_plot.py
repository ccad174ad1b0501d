"""PNG plots drawn from the benchmarks' JSON results, never by hand.

    mvgen bench plot [--results out/benchmarks] [--out DIR]
    python -m benchmarks.bench_plot [same options]

Reads whichever of ``bench_denoiser.json``, ``bench_server.json`` and ``bench_pipeline.json`` exist in
``--results`` and writes (matplotlib, Agg backend):

- ``denoiser_step_time.png``: step time (median, p90 as the error bar) against tokens, engine and diffusers
  lines, one panel per size, reference count and compile setting (rows marked approximate, step caching, are
  left to the table);
- ``denoiser_ratio.png``: engine / diffusers step time per variant and token count (below 1: the engine is faster);
- ``server_latency.png``: latency p50/p95/p99 and throughput (with the solo throughput) against concurrency,
  and a lone request's p50 in process and served with their ratio;
- ``pipeline_phases.png``: a generation's time split into encode, denoise, decode and the rest.

Each plot's caption names the machine and revision of the JSON it came from; ``bench_plot.json``/``.md`` list
the PNGs with their sources.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from engine.errors import UsageError

NAME = "plot"
HELP = "PNG plots from the JSON results of bench denoiser / server / pipeline"
RESULTS = "bench_plot"
SOURCES = ("bench_denoiser", "bench_server", "bench_pipeline")


def _caption(payload: dict) -> str:
    machine = payload.get("machine", {})
    return f"{machine.get('device', '?')}, torch {machine.get('torch', '?')}, revision {payload.get('revision', '?')}"


def _timed(rows: list[dict]) -> list[dict]:
    """Rows with a step time, less the approximate ones (step caching: a mix of computed and skipped steps on
    synthetic inputs; the table has them)."""
    return [row for row in rows if row.get("median_ms") is not None and not row.get("approximate")]


def _series_name(row: dict) -> str:
    if row["variant"] == "diffusers":
        return "diffusers"
    return f"{row['variant']} [{row['backend']}]"


def _panels(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by (size, references, compiled): one panel each."""
    panels = defaultdict(list)
    for row in _timed(rows):
        panels[(row["config"], row["refs"], row["compiled"])].append(row)
    return dict(panels)


def _grid(plt, count: int, width: float = 6.0, height: float = 4.2):
    cols = min(count, 2)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def plot_step_time(plt, payload: dict, path: Path) -> None:
    panels = _panels(payload["rows"])
    fig, axes = _grid(plt, len(panels))
    for ax, ((config, refs, compiled), rows) in zip(axes, sorted(panels.items(), key=lambda kv: (kv[0][0], kv[0][2],
                                                                                              kv[0][1]))):
        series = defaultdict(list)
        for row in rows:
            series[_series_name(row)].append(row)
        for name, points in sorted(series.items(), key=lambda kv: (kv[0] != "diffusers", kv[0])):
            points.sort(key=lambda r: r["video_tokens"])
            x = [r["video_tokens"] + r["ref_tokens"] for r in points]
            y = [r["median_ms"] for r in points]
            above = [max(r["p90_ms"] - r["median_ms"], 0.0) for r in points]
            style = dict(color="black", linewidth=2.2) if name == "diffusers" else {}
            ax.errorbar(x, y, yerr=[[0.0] * len(y), above], marker="o", capsize=3, label=name, **style)
        layers = rows[0]["layers"]
        depth = f", {layers} of {rows[0]['depth']} layers" if rows[0].get("depth") else f", {layers} layers"
        ax.set_title(f"{config}{depth}, R = {refs}{', compiled' if compiled == 'yes' else ''}", fontsize=10)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens (video + reference)")
        ax.set_ylabel("step time, median (ms); bar: p90")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Denoiser step time: engine vs diffusers\n{_caption(payload)}", fontsize=10)
    _save(plt, fig, path)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ratio(plt, payload: dict, path: Path) -> None:
    rows = [row for row in _timed(payload["rows"]) if row.get("ratio") is not None]
    groups = sorted({(r["config"], r["refs"], r["compiled"], r["video_tokens"]) for r in rows},
                    key=lambda g: (g[0], g[2], g[1], g[3]))
    names = sorted({_series_name(r) for r in rows})
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(len(names), 1) ** 0.5 + 3), 4.5))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        ratios = {(r["config"], r["refs"], r["compiled"], r["video_tokens"]): r["ratio"]
                  for r in rows if _series_name(r) == name}
        xs = [g + i * width for g, key in enumerate(groups) if key in ratios]
        ax.bar(xs, [ratios[key] for key in groups if key in ratios], width, label=name)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{c}\n{t} tok, R={r}{' (c)' if comp == 'yes' else ''}" for c, r, comp, t in groups],
                       fontsize=8)
    ax.set_ylabel("engine / diffusers step time (below 1: engine faster)")
    ax.legend(fontsize=7)
    ax.set_title(f"Engine vs diffusers, same weights and inputs\n{_caption(payload)}", fontsize=10)
    _save(plt, fig, path)


def _server_series(rows: list[dict]) -> tuple[dict | None, list[dict]]:
    """The base row (a lone request compared with the in-process pipeline; None in older results) and the rows
    drawn against concurrency: the solo row of the mix (else the base row) and the levels above 1."""
    if not any("kind" in row for row in rows):  # results from before the in-process comparison: every row a level
        return None, sorted(rows, key=lambda r: r["concurrency"])
    base = next((row for row in rows if row["kind"] == "base"), None)
    solo = [row for row in rows if row["kind"] == "solo"] or [base]
    return base, sorted([*solo, *(row for row in rows if row["kind"] == "level")], key=lambda r: r["concurrency"])


def plot_server(plt, payload: dict, path: Path) -> None:
    base, rows = _server_series(payload["rows"])
    compared = base is not None and base.get("served_over_in_process") is not None
    x = [r["concurrency"] for r in rows]
    fig, axes = plt.subplots(1, 3 if compared else 2, figsize=(16 if compared else 11, 4.2))
    lat, thr = axes[:2]
    for key, label in (("p50_s", "p50"), ("p95_s", "p95"), ("p99_s", "p99")):
        lat.plot(x, [r[key] for r in rows], marker="o", label=label)
    lat.legend()
    thr.plot(x, [r["throughput_rps"] for r in rows], marker="o", color="tab:green", label="served")
    if rows and rows[0].get("solo_throughput_rps") is not None:
        thr.axhline(rows[0]["solo_throughput_rps"], color="black", linestyle="--", linewidth=1,
                    label="solo (one at a time)")
        thr.legend()
    for axis, label in ((lat, "end-to-end latency (s)"), (thr, "throughput (requests/s)")):
        shapes = rows[-1].get("shapes_label")
        axis.set_xlabel("concurrent requests" + (f" ({shapes})" if shapes else ""))
        axis.set_ylabel(label)
        axis.set_xscale("log", base=2)
        axis.set_xticks(x, [str(c) for c in x])
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
    if compared:
        _plot_in_process(axes[2], base)
    config = payload.get("config", {})
    what = (f"{config.get('model', '?')}: {config.get('frames', '?')} frames {config.get('width', '?')}x"
            f"{config.get('height', '?')}, {config.get('steps', '?')} steps, {config.get('refs', '?')} refs")
    fig.suptitle(f"Server latency and throughput ({what})\n{_caption(payload)}", fontsize=10)
    _save(plt, fig, path)


def _plot_in_process(ax, base: dict) -> None:
    """The lone request's p50 in process and served, with their ratio."""
    values = (base["in_process_p50_s"], base["p50_s"])
    ax.bar((0, 1), values, 0.6, color=("tab:gray", "tab:blue"))
    ax.set_xticks((0, 1), ("in process\n(Python API)", "served\n(mvgen serve)"))
    ax.set_ylabel("latency of one request, p50 (s)")
    identical = "bit-identical" if base.get("served_equals_in_process") else "videos DIFFER"
    ax.set_title(f"concurrency 1: served / in-process = {base['served_over_in_process']:.3g} ({identical})",
                 fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)


def plot_pipeline(plt, payload: dict, path: Path) -> None:
    rows = payload["rows"]
    phases = (("encode_s", "encode"), ("denoise_s", "denoise"), ("decode_s", "decode"), ("other_s", "other"))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(rows) + 2), 4.2))
    bottom = [0.0] * len(rows)
    for key, label in phases:
        values = [max(r[key], 0.0) for r in rows]
        ax.bar(range(len(rows)), values, 0.6, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(rows)), [f"{r['config']}\n{r['frames']}f {r['size']}, {r['steps']} steps" for r in rows],
                  fontsize=8)
    ax.set_ylabel("seconds per generation (median)")
    ax.legend()
    ax.set_title(f"Pipeline time by phase\n{_caption(payload)}", fontsize=10)
    _save(plt, fig, path)


PLOTS = {  # source -> (png name, function)
    "bench_denoiser": (("denoiser_step_time.png", plot_step_time), ("denoiser_ratio.png", plot_ratio)),
    "bench_server": (("server_latency.png", plot_server),),
    "bench_pipeline": (("pipeline_phases.png", plot_pipeline),),
}


def load_results(results: Path) -> dict[str, dict]:
    found = {}
    for name in SOURCES:
        path = results / f"{name}.json"
        if path.is_file():
            try:
                found[name] = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise UsageError(f"{path} is not JSON ({error.msg} at line {error.lineno})") from None
    if not found:
        raise UsageError(f"--results {results}: none of {', '.join(f'{n}.json' for n in SOURCES)} is there "
                         f"(run mvgen bench denoiser / server / pipeline first)")
    return found


def add_arguments(p) -> None:
    p.add_argument("--results", type=Path, default=Path("out/benchmarks"),
                   help="directory holding bench_*.json (default out/benchmarks)")
    p.add_argument("--out", type=Path, help="directory for the PNGs and bench_plot.json/.md (default: --results)")


def run(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .common import write_results

    found = load_results(args.results)
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for source, payload in found.items():
        for png, draw in PLOTS[source]:
            if (source == "bench_denoiser" and not _timed(payload.get("rows", []))) or not payload.get("rows"):
                print(f"mvgen bench plot: {source}.json has no timed rows: {png} not drawn", file=sys.stderr)
                continue
            draw(plt, payload, out / png)
            rows.append({"png": png, "source": f"{source}.json", "source_revision": payload.get("revision"),
                         "machine": payload.get("machine", {}).get("device")})
    config = {"results": str(args.results), "sources": sorted(found)}
    print(write_results(RESULTS, rows, [("png", "plot"), ("source", "from"), ("source_revision", "revision"),
                                        ("machine", "machine")], out, config))
    return 0


def main(argv=None) -> int:
    from .common import standalone_main

    return standalone_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
