"""``mvgen bench plot``: PNGs drawn from small result files of each benchmark, and a refusal without any."""
from __future__ import annotations

import json

from PIL import Image

from mvgen.cli import main

MACHINE = {"device": "CPU (test)", "torch": "2.x", "cpu_threads": 1}


def _denoiser_rows() -> list[dict]:
    rows = []
    for tokens, scale in ((320, 1.0), (1280, 4.5)):
        for key, variant, backend, ms, ratio in (("diffusers", "diffusers", "diffusers default", 10.0, None),
                                                  ("engine-auto", "engine", "auto", 8.0, 0.8),
                                                  ("engine-auto-refcache-on", "engine, reference cache on", "auto",
                                                   6.0, 0.6)):
            rows.append({"config": "cpu", "layers": 4, "depth": None, "refs": 3, "compiled": "no", "key": key,
                         "variant": variant, "backend": backend, "video_tokens": tokens, "ref_tokens": tokens // 5 * 3,
                         "median_ms": ms * scale, "p90_ms": ms * scale * 1.1, "ratio": ratio})
    rows.append({"config": "cpu", "layers": 4, "depth": None, "refs": 3, "compiled": "no", "key": "engine-auto-x",
                 "variant": "engine, skipped", "backend": "auto", "video_tokens": 320, "ref_tokens": 192,
                 "skipped": True, "note": "skipped: ..."})
    return rows


RESULTS = {
    "bench_denoiser": _denoiser_rows(),
    "bench_server": [{"kind": "base" if c == 0 else "solo" if c == 1 else "level", "concurrency": max(c, 1),
                      "shapes_label": "base, short, wide", "p50_s": 1.0 + c / 10, "p95_s": 1.2 + c / 8,
                      "p99_s": 1.3 + c / 6, "throughput_rps": max(c, 1) / (1.0 + c / 10), "solo_throughput_rps": 1.0,
                      **({"in_process_p50_s": 0.96, "served_over_in_process": 1.04, "served_equals_in_process": True}
                         if c == 0 else {})} for c in (0, 1, 2, 4, 8)],
    "bench_pipeline": [{"config": "tiny", "frames": 17, "size": "128x128", "steps": 10, "encode_s": 0.2,
                        "denoise_s": 1.5, "decode_s": 0.3, "other_s": 0.05}],
}


def test_plots_are_pngs_drawn_from_the_json(tmp_path, capsys):
    for name, rows in RESULTS.items():
        payload = {"benchmark": name, "machine": MACHINE, "revision": "abc1234", "config": {"model": "tiny"},
                   "rows": rows}
        (tmp_path / f"{name}.json").write_text(json.dumps(payload))
    out = tmp_path / "png"
    assert main(["bench", "plot", "--results", str(tmp_path), "--out", str(out)]) == 0
    names = ("denoiser_step_time.png", "denoiser_ratio.png", "server_latency.png", "pipeline_phases.png")
    for name in names:
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
    listed = json.loads((out / "bench_plot.json").read_text())["rows"]
    assert {row["png"] for row in listed} == set(names) and {row["source_revision"] for row in listed} == {"abc1234"}
    assert "| server_latency.png | bench_server.json | abc1234 |" in capsys.readouterr().out


def test_no_results_is_a_usage_error(tmp_path, capsys):
    assert main(["bench", "plot", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mvgen: error: ") and "bench_denoiser.json" in err and err.count("\n") == 1


def test_server_rows_drawn_against_concurrency():
    """The solo row and the levels make the concurrency series, the base row the in-process comparison; results
    from before that comparison (rows without a kind) are every one a level."""
    from benchmarks.bench_plot import _server_series

    rows = RESULTS["bench_server"]
    base, series = _server_series(rows)
    assert base is rows[0] and [r["kind"] for r in series] == ["solo", "level", "level", "level"]
    base, series = _server_series([{"concurrency": c} for c in (4, 1, 2)])
    assert base is None and [r["concurrency"] for r in series] == [1, 2, 4]
    base, series = _server_series([{**row, "kind": "level" if row["concurrency"] > 1 else "base"} for row in rows[1:]])
    assert base is not None and [r["kind"] for r in series] == ["base", "level", "level", "level"]  # --no-mixed
