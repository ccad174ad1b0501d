"""``mvgen bench comm``: the Ulysses byte counts against a simulated all-to-all, the compute against torch's FLOP
counter on a real (tiny) denoiser, and the command line's files and refusals."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from benchmarks.sp_comm import NOT_DIVISIBLE, Video, gather_bytes, step_flops, ulysses_bytes
from mvgen.cli import build_parser, main

HEADS, HEAD_DIM, ROWS = 24, 4, 2  # 24 heads: divisible by every sp below


def _padded_stream(rows: int, tokens: int, sp: int, dtype, gen) -> torch.Tensor:
    """A stream [rows, tokens, H, Dh] zero-padded along the tokens to the next multiple of sp."""
    x = torch.randn(rows, tokens, HEADS, HEAD_DIM, generator=gen).to(dtype)
    return F.pad(x, (0, 0, 0, 0, 0, (-tokens) % sp))


def simulated_ulysses_sent(streams, sp: int, rows: int, dtype, gen) -> list[int]:
    """Bytes each rank sends in one layer: Q, K, V token shards -> head shards, then the output back, each
    stream on its own; every exchange is checked to deliver what Ulysses attention needs."""
    sent = [0] * sp
    for tokens in streams:
        for _ in range(3):  # Q, K, V: rank r's token shard, cut by heads, piece j to rank j
            full = _padded_stream(rows, tokens, sp, dtype, gen)
            pieces = [shard.tensor_split(sp, dim=2) for shard in full.tensor_split(sp, dim=1)]  # [from][to]
            for r in range(sp):
                sent[r] += sum(pieces[r][j].numel() * pieces[r][j].element_size() for j in range(sp) if j != r)
            for j in range(sp):  # rank j holds every token of its heads
                got = torch.cat([pieces[r][j] for r in range(sp)], dim=1)
                assert torch.equal(got, full.tensor_split(sp, dim=2)[j])
        out = _padded_stream(rows, tokens, sp, dtype, gen)  # the output: head shards back to token shards
        pieces = [heads.tensor_split(sp, dim=1) for heads in out.tensor_split(sp, dim=2)]  # [from][to]
        for j in range(sp):
            sent[j] += sum(pieces[j][r].numel() * pieces[j][r].element_size() for r in range(sp) if r != j)
        for r in range(sp):
            assert torch.equal(torch.cat([pieces[j][r] for j in range(sp)], dim=2), out.tensor_split(sp, dim=1)[r])
    return sent


@pytest.mark.parametrize("streams", [(1,), (7,), (13, 5), (100, 0), (1021, 37)])
@pytest.mark.parametrize("sp", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ulysses_bytes_match_a_simulated_all_to_all(streams, sp, dtype):
    gen = torch.Generator().manual_seed(sum(streams) * 31 + sp)
    sent = simulated_ulysses_sent(streams, sp, ROWS, dtype, gen)
    assert len(set(sent)) == 1  # every rank sends the same
    size = torch.empty((), dtype=dtype).element_size()
    assert ulysses_bytes(streams, HEADS, HEAD_DIM, sp, ROWS, size) == sent[0]
    if len(streams) == 1:
        assert ulysses_bytes(streams[0], HEADS, HEAD_DIM, sp, ROWS, size) == sent[0]


@pytest.mark.parametrize("tokens", [1, 9, 250])
@pytest.mark.parametrize("sp", [1, 2, 3, 8])
def test_gather_bytes_match_a_simulated_ring_all_gather(tokens, sp):
    """A ring all-gather: in each of sp - 1 steps every rank passes on the shard it received last."""
    x = F.pad(torch.randn(ROWS, tokens, 64).to(torch.bfloat16), (0, 0, 0, (-tokens) % sp))
    shards = list(x.tensor_split(sp, dim=1))
    have = [{r: shards[r]} for r in range(sp)]
    sent, passing = [0] * sp, list(range(sp))  # passing[r]: the shard rank r sends next
    for _ in range(sp - 1):
        for r in range(sp):
            shard = have[r][passing[r]]
            have[(r + 1) % sp][passing[r]] = shard
            sent[r] += shard.numel() * shard.element_size()
        passing = [passing[(r - 1) % sp] for r in range(sp)]
    assert all(torch.equal(torch.cat([h[i] for i in range(sp)], 1), x) for h in have)
    assert sent == [gather_bytes(tokens, 64, sp, ROWS, 2)] * sp


def test_sp_must_divide_the_heads():
    with pytest.raises(ValueError, match="does not divide the 12 heads"):
        ulysses_bytes(35460, 12, 128, 8)


@pytest.mark.parametrize("task, refs", [("i2v", 2), ("t2v", 2), ("i2v", 0)])
def test_step_flops_match_torch_flop_counter(task, refs):
    """One GPU's step (sp=1, cond + uncond rows) on a tiny denoiser: torch's count of its matrix products, less
    the parts the model leaves out (patch embedding, condition embedders, output head)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from engine.config import MvgenConfig
    from engine.backbones.wan.model import MultiViewWanTransformer

    i2v = task == "i2v"
    cfg = MvgenConfig(num_attention_heads=2, attention_head_dim=16, ffn_dim=48, num_layers=3, text_dim=16,
                      freq_dim=16, text_len=8, in_channels=36 if i2v else 16, image_dim=24 if i2v else None,
                      added_kv_proj_dim=32 if i2v else None, attention_backend="sdpa")
    video = Video("tiny", frames=5, height=64, width=48, refs=refs, ref_hw=(32, 64))
    f, h, w = video.latent_fhw
    gen = torch.Generator().manual_seed(7)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    torch.manual_seed(0)
    den = MultiViewWanTransformer(cfg).eval()
    inputs = dict(latents=r(ROWS, 16, f, h, w), condition=r(ROWS, 20, f, h, w) if i2v else None,
                  timestep=torch.full((ROWS,), 500.0), text=r(ROWS, 8, 16),
                  image_context=r(ROWS, 257, 24) if i2v else None,
                  ref_latents=r(ROWS, refs, 16, *video.ref_latent_hw) if refs else None)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        den(**inputs)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    # the condition embedder runs through its children (its methods, not its forward): count those
    left_out = [f"MultiViewWanTransformer.{m}" for m in ("patch_embedding", "proj_out")] + [
        name for name in counts if name.startswith("MultiViewWanTransformer.condition_embedder.")
        and name.count(".") == 2]
    assert len(left_out) == 5 + i2v  # time embedding + projection, text embedder, (image embedder)
    left_out = sum(counts[name] for name in left_out)
    assert step_flops(cfg, video, sp=1, rows=ROWS) == counts["Global"] - left_out


def test_bench_comm_writes_json_and_markdown(tmp_path, capsys):
    assert main(["bench", "comm", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    table = (tmp_path / "sp_comm.md").read_text()
    assert table in printed and "assumption, not a measurement" in printed
    assert "81675 (75600+6075)" in table and "35460 (32760+2700)" in table
    payload = json.loads((tmp_path / "sp_comm.json").read_text())
    assert {"machine", "revision", "config", "rows"} <= set(payload)
    rows = {(r["model"], r["size"], r["sp"], r["layout"]): r for r in payload["rows"]}
    assert len(rows) == 2 * 2 * 3 * 2  # models x resolutions x sp x layouts
    big = rows[("Wan2.1-I2V-14B", "720p", 8, "SP")]
    assert big["bytes_per_layer"] == ulysses_bytes((75600, 6075), 40, 128, 8, rows=2, dtype_bytes=2)
    assert big["gpus"] == 8 and rows[("Wan2.1-I2V-14B", "720p", 8, "SP+CFG")]["gpus"] == 16
    # CFG parallel halves the all-to-all per GPU and adds one row's velocity (16 x 21 x 90 x 160 bf16)
    cfg_row = rows[("Wan2.1-I2V-14B", "720p", 8, "SP+CFG")]
    assert 2 * cfg_row["bytes_per_layer"] == big["bytes_per_layer"] and cfg_row["bytes_cfg"] == 16 * 21 * 90 * 160 * 2


def test_heads_not_divisible_by_sp_are_not_numbers(tmp_path, capsys):
    assert main(["bench", "comm", "--model", "1.3B", "--resolution", "480p", "--sp", "4", "8",
                 "--out", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| Wan")]
    assert len(lines) == 4
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        sp, numbers = int(cells[3]), cells[6:]
        if sp == 8:  # 12 heads
            assert numbers[0] == NOT_DIVISIBLE and not any(numbers[1:])
        else:
            assert all(float(n) > 0 for n in numbers)


def test_custom_sizes_replace_the_presets(tmp_path, capsys):
    assert main(["bench", "comm", "--model", "14B", "--height", "256", "--width", "448", "--frames", "17",
                 "--refs", "1", "--ref-size", "256x128", "--sp", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "sp_comm.json").read_text())["rows"]
    assert {r["size"] for r in rows} == {"448x256"}
    assert rows[0]["video_tokens"] == 5 * 16 * 28 and rows[0]["ref_tokens"] == 16 * 8


@pytest.mark.parametrize("argv, words", [
    (["--sp", "0"], "--sp takes positive integers"),
    (["--sp", "2", "-1"], "got [-1]"),
    (["--height", "-480", "--width", "832"], "--height must be a positive multiple of 16"),
    (["--height", "480", "--width", "830"], "--width must be a positive multiple of 16"),
    (["--height", "480"], "--height and --width go together"),
    (["--ref-size", "500"], "--ref-size must be a positive multiple of 16"),
    (["--ref-size", "big"], "expected N or HEIGHTxWIDTH"),
    (["--frames", "80"], "--frames must be 4k + 1"),
    (["--refs", "-1"], "--refs must be >= 0"),
    (["--pcie", "0"], "--pcie must be positive"),
    (["--model", "7B"], "invalid choice: '7B'"),
])
def test_bad_arguments_are_one_line_usage_errors(tmp_path, capsys, argv, words):
    assert main(["bench", "comm", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mvgen: error: ") and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "sp_comm.json").exists()


def test_bench_is_a_command_group():
    assert "    bench " in build_parser({}).format_help()
    assert main(["bench"]) == 2


def test_python_dash_m_runs_the_benchmark(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.sp_comm", "--model", "1.3B", "--sp", "2",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "sp_comm.json").is_file() and "| Wan2.1-T2V-1.3B | 480p |" in result.stdout
