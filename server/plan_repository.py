"""A Triton model repository whose ``mvgen_denoiser`` is a TensorRT plan built by ``mvgen export tensorrt``.

The repository itself (the python-backend models ``mvgen``, ``mvgen_stream``, encoders, VAE, and the
``config.pbtxt`` writer) is ``server.repository.build_repository``; this module only turns a plan and the
metadata beside it (``engine.denoiser_io.read_plan_meta``) into its options: ``mvgen_denoiser`` becomes
``platform: "tensorrt_plan"`` with the I/O of ``engine.denoiser_io``, the graph's I/O dtype and a max batch
equal to the plan's profile. It reads the plan's metadata, never ``export``: the server does not import
the exporter.
"""
from __future__ import annotations

from pathlib import Path

from engine.denoiser_io import read_plan_meta
from engine.tiny import resolve_checkpoint

from .repository import RepositoryOptions, build_repository

_TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def repository_options(plan: str | Path, model: str | None = None, adapter: str | Path | None = None,
                       cache_root: str | Path | None = None, **options) -> RepositoryOptions:
    """Options serving ``plan`` (model/adapter default to the checkpoint the plan was exported from;
    ``cache_root`` is where ``tiny`` is built when that is the model)."""
    meta = read_plan_meta(plan)
    source = meta.get("source", {})
    adapter = adapter if adapter is not None else source.get("adapter")
    model, adapter = resolve_checkpoint(model or source.get("model") or "tiny", adapter, cache_root)
    return RepositoryOptions(
        model=str(model), adapter=str(adapter) if adapter else None,
        dtype=_TORCH_DTYPE_NAMES[meta["dtype"]], device="cuda", denoiser_plan=str(plan),
        max_batch_rows=meta["profile"]["batch"][2], **options,
    )


def write_repository(plan: str | Path, out: str | Path, model: str | None = None,
                     adapter: str | Path | None = None, cache_root: str | Path | None = None, **options) -> Path:
    """Write the full repository into ``out`` with the plan as ``mvgen_denoiser/1/model.plan``."""
    return build_repository(out, repository_options(plan, model, adapter, cache_root, **options))
