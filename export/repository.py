"""A Triton model repository whose ``mvgen_denoiser`` is the TensorRT plan.

The repository itself (the python-backend models ``mvgen``, ``mvgen_stream``, encoders, VAE, and the
``config.pbtxt`` writer) is ``server.repository.build_repository``; this module only turns a plan built by
``mvgen export tensorrt`` into its options: ``mvgen_denoiser`` becomes ``platform: "tensorrt_plan"`` with the
I/O names and dims of ``export.names``, the graph's I/O dtype and a max batch equal to the plan's profile.
"""
from __future__ import annotations

from pathlib import Path

from .tensorrt_build import read_plan_meta

_TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def repository_options(plan: str | Path, model: str | None = None, adapter: str | Path | None = None, **options):
    """``server.repository.RepositoryOptions`` serving ``plan`` (model/adapter default to the plan's source)."""
    from server.repository import RepositoryOptions

    meta = read_plan_meta(plan)
    source = meta.get("source", {})
    adapter = adapter if adapter is not None else source.get("adapter")
    return RepositoryOptions(
        model=str(model or source.get("model") or "tiny"), adapter=str(adapter) if adapter else None,
        dtype=_TORCH_DTYPE_NAMES[meta["dtype"]], device="cuda", denoiser_plan=str(plan),
        max_batch_rows=meta["profile"]["batch"][2], **options,
    )


def write_repository(plan: str | Path, out: str | Path, model: str | None = None,
                     adapter: str | Path | None = None, **options) -> Path:
    """Write the full repository into ``out`` with the plan as ``mvgen_denoiser/1/model.plan``."""
    from server.repository import build_repository

    return build_repository(out, repository_options(plan, model, adapter, **options))
