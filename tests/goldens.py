"""Golden outputs: tensors recorded once at fixed seeds, then compared bit for bit, to guard code moves.

Bits depend on the CPU's kernels (AVX2 and AVX-512/AMX pick different GEMM blockings), so each file records the
machine that wrote it: on that machine (same CPU model, ISA level and torch) the comparison is ``torch.equal``; on
another it is a relative error under ``OTHER_MACHINE_RTOL`` (float32 rounding, measured between the two CPUs these
machines have), and the test says which one it checked. Record with ``python -m tests.goldens record`` (or
``MVGEN_RECORD_GOLDENS=1 pytest ...``) before a refactor, on the machine that will run it.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

GOLDEN_DIR = Path(__file__).parent / "goldens"
RECORD_ENV = "MVGEN_RECORD_GOLDENS"
OTHER_MACHINE_RTOL = 2e-5


def machine() -> str:
    """What decides the bits of a float32 CPU forward: CPU model, the ISA torch dispatches to, torch's version."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__}"


def check_golden(name: str, tensors: dict[str, torch.Tensor], record: bool | None = None) -> str:
    """Compare ``tensors`` with the golden file ``name`` (or write it when recording); returns how it compared."""
    path = GOLDEN_DIR / f"{name}.safetensors"
    record = os.environ.get(RECORD_ENV) == "1" if record is None else record
    if record:
        GOLDEN_DIR.mkdir(exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
                  metadata={"machine": machine()})
        return "recorded"
    assert path.exists(), f"no golden {path.name}: record it with {RECORD_ENV}=1 before changing the code"
    with safe_open(str(path), "pt") as f:
        recorded_on = f.metadata().get("machine")
        golden = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(golden) == sorted(tensors), f"golden {name} holds {sorted(golden)}, got {sorted(tensors)}"
    same_machine = recorded_on == machine()
    for key, want in golden.items():
        got = tensors[key].detach().cpu()
        assert got.shape == want.shape and got.dtype == want.dtype, f"{name}/{key}: {got.shape} vs {want.shape}"
        if same_machine:
            diff = (got.double() - want.double()).abs().max().item()
            assert torch.equal(got, want), f"{name}/{key} differs from its golden bits (max |diff| {diff:.3g})"
        else:
            err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
            assert err < OTHER_MACHINE_RTOL, f"{name}/{key}: relative error {err:.3g} against the golden of " \
                                             f"{recorded_on!r}"
    return "bits" if same_machine else f"rtol {OTHER_MACHINE_RTOL} (recorded on {recorded_on!r})"


if __name__ == "__main__":
    import subprocess
    import sys

    if sys.argv[1:] != ["record"]:
        raise SystemExit("usage: python -m tests.goldens record")
    env = dict(os.environ, **{RECORD_ENV: "1"})
    raise SystemExit(subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "golden", "tests"], env=env))
