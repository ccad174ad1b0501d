"""TensorRT engines from the exported ONNX graph: build (profiles, precision, timing cache, refit) and refit.

Everything here needs ``tensorrt`` (and a GPU); where it cannot be imported every entry point raises
``TensorRTUnavailable("skipped: tensorrt not installed")``, which the CLI reports as a skip (exit status 3),
never as success.

- Optimization profiles come from ``engine.denoiser_io`` (one min/opt/max range per dynamic axis), so the
  engine, the ONNX graph and the Triton ``config.pbtxt`` agree on names and dims.
- Precision: a graph exported in fp16/bf16 is built *strongly typed* (TensorRT keeps the ONNX types; no
  precision flags). Asking for ``--fp16``/``--bf16`` on an fp32 graph builds a weakly typed network with
  that flag instead (TensorRT chooses per layer), which is the only case where strong typing is not used.
  A ``--quantize fp8`` graph (FP8 weights behind DequantizeLinear, Q/DQ on each GEMM's activations:
  ``export.fp8_onnx``) builds FP8 GEMMs either way: strongly typed from its Q/DQ types, weakly typed with the FP8
  flag beside the asked one; the plan's ``PLAN.json`` keeps the graph's ``fp8`` record. A refit exports the graph
  again with the activation scales that record holds (``refit_onnx``), not calibrated anew: the new reference
  weights and their per-channel scales change, the Q/DQ scales the engine was built with stay (TensorRT's refit of
  Q/DQ scales is untested here: no TensorRT).
- ``plugin`` graphs: ``register_joint_attention_plugin`` registers ``mvgen::JointAttention`` as a
  quickly-deployable plugin whose AOT implementation is ``export/trt_kernel.py``'s Triton kernel compiled to
  PTX for the build GPU; the engine embeds it, so running it needs no Python. The ONNX nodes carry
  ``plugin_namespace="mvgen"``, which is how TensorRT's ONNX parser finds the plugin.
- ``native`` graphs: attention is plain MatMul/Softmax that TensorRT fuses into its own attention kernels.
  RoPE is elementwise Sin/Cos/Mul/Add on Q and K. TensorRT 10.15+ also has a native rotary-embedding layer
  (``INetworkDefinition.add_rotary_embedding``, ONNX ``RotaryEmbedding`` from opset 23): it takes cos/sin
  caches [max_pos, D/2] indexed by one position id per token, so our 3-axis Wan RoPE maps onto it as the
  cos/sin of the per-token angle table ``kernels.rope.rope_angles(pos)`` (already computed in-graph) fed
  with position ids ``arange(N)`` and ``interleaved=True``; exporting with ``torch.onnx.ops.rotary_embedding``
  at opset 23 would let the parser emit that layer instead of the elementwise chain.
- Refit: engines built with ``refit=True`` keep refittable weights; ``refit_engine`` exports the denoiser
  with a new adapter merged and hands that ONNX file to ``trt.OnnxParserRefitter``, which maps initializers
  to engine weights by name (same graph, new LoRA): no rebuild.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from engine import denoiser_io
from engine.denoiser_io import plan_meta_path, read_plan_meta

from .onnx_export import export_onnx, read_meta

SKIP_REASON = "skipped: tensorrt not installed"
PLUGIN_ID = "mvgen::JointAttention"


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or a GPU for it) is not available here; the message is the skip reason."""


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as error:
        raise TensorRTUnavailable(SKIP_REASON) from error
    return trt


# ---- plugin ----------------------------------------------------------------------------------------------
_REGISTERED = False


def register_joint_attention_plugin() -> None:
    """Register ``mvgen::JointAttention`` (shape function, dtype combinations, AOT Triton implementation)."""
    global _REGISTERED
    if _REGISTERED:
        return
    trt = import_tensorrt()
    import tensorrt.plugin as trtp
    import torch

    from .trt_kernel import compile_plugin_kernel, launch_config

    dtypes = {trt.float16: "fp16", trt.bfloat16: "bf16", trt.float32: "fp32"}

    @trtp.register(PLUGIN_ID)
    def joint_attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, n_video: trtp.TensorDesc,
                             mask: str) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune(PLUGIN_ID)
    def joint_attention_autotune(q, k, v, n_video, mask: str, outputs) -> list:
        combination = trtp.AutoTuneCombination()
        combination.pos([0, 1, 2, 4], "FP16|BF16|FP32")
        combination.pos([3], "INT64")
        return [combination]

    @trtp.aot_impl(PLUGIN_ID)
    def joint_attention_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, n_video: trtp.TensorDesc,
                            mask: str, outputs, tactic: int):
        dtype = dtypes[q.dtype]
        head_dim = int(q.shape_expr[3].constant_value())
        major, minor = torch.cuda.get_device_capability()
        compiled = compile_plugin_kernel(dtype, head_dim, mask, 10 * major + minor)
        block_m = launch_config(dtype, head_dim, 10 * major + minor)[0]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(q.shape_expr[1], block_m)
        launch.grid_y = q.shape_expr[0] * q.shape_expr[2]
        launch.block_x = compiled.metadata.num_warps * 32
        launch.shared_mem = compiled.metadata.shared  # > 48 KiB: dynamic shared memory
        extra = trtp.SymIntExprs(3)  # n_tokens, n_heads, batch
        extra[0] = trtp.SymInt32(q.shape_expr[1])
        extra[1] = trtp.SymInt32(q.shape_expr[2])
        extra[2] = trtp.SymInt32(q.shape_expr[0])
        return compiled.metadata.name, compiled.asm["ptx"], launch, extra

    _REGISTERED = True


# ---- build -----------------------------------------------------------------------------------------------
def build_engine(onnx_dir: str | Path, plan: str | Path, profile: denoiser_io.Profile | None = None,
                 precision: str | None = None, timing_cache: str | Path | None = None, refit: bool = False,
                 workspace_gib: float | None = None) -> Path:
    """Build ``plan`` from ``onnx_dir`` (written by ``export_onnx``); returns the plan path.

    ``precision`` None/"fp32"/"fp16"/"bf16": None keeps the graph's own dtype (strongly typed).
    """
    trt = import_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath
    from polygraphy.backend.trt import Profile as TrtProfile
    from polygraphy.backend.trt import save_engine

    onnx_dir = Path(onnx_dir)
    meta = read_meta(onnx_dir)
    if meta["attention"] == "plugin":
        register_joint_attention_plugin()
    graph_dtype = meta["dtype"]
    strongly_typed = precision in (None, graph_dtype)
    if not strongly_typed and graph_dtype != "fp32":
        raise ValueError(f"the graph is {graph_dtype}; rebuild it with `mvgen export onnx --dtype {precision}` "
                         f"instead of asking TensorRT for {precision}")
    profile = profile or denoiser_io.Profile({k: tuple(v) for k, v in meta["profile"].items()})
    specs = denoiser_io.config_specs(meta["config"])
    trt_profile = TrtProfile()
    for name, (lo, opt, hi) in profile.shapes(specs).items():
        trt_profile.add(name, min=lo, opt=opt, max=hi)

    network = NetworkFromOnnxPath(str(onnx_dir / meta["onnx"]), strongly_typed=strongly_typed)
    config = CreateConfig(
        fp16=not strongly_typed and precision == "fp16",
        bf16=not strongly_typed and precision == "bf16",
        # a --quantize fp8 graph's Q/DQ pairs (export.fp8_onnx) carry FP8 types: a strongly typed network keeps them,
        # a weakly typed one needs the FP8 flag to run its GEMMs in FP8
        fp8=not strongly_typed and bool(meta.get("fp8")),
        profiles=[trt_profile],
        refittable=refit,
        load_timing_cache=str(timing_cache) if timing_cache and Path(timing_cache).is_file() else None,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_gib * 2**30)} if workspace_gib else None,
    )
    engine = EngineFromNetwork(network, config, save_timing_cache=str(timing_cache) if timing_cache else None)
    plan = Path(plan)
    plan.parent.mkdir(parents=True, exist_ok=True)
    save_engine(engine, str(plan))
    plan_meta = {**meta, "onnx_dir": str(onnx_dir.resolve()), "profile": profile.to_dict(), "refittable": refit,
                 "precision": precision or graph_dtype, "strongly_typed": strongly_typed,
                 "tensorrt": trt.__version__}
    plan_meta_path(plan).write_text(json.dumps(plan_meta, indent=2))
    return plan


# ---- refit -----------------------------------------------------------------------------------------------
def refit_onnx(meta: dict, adapter: str | Path, out_dir: str | Path, model: str | Path | None = None,
               lora_scale: float | None = None, cache_root: str | Path | None = None) -> Path:
    """The ONNX graph a refit reads its weights from (no TensorRT needed): the plan's graph (``meta``: its
    ``PLAN.json`` or ``export.json``) exported again with ``adapter`` as the reference stream's, the same expert, base
    LoRAs and single file, and a ``--quantize fp8`` graph's activation scales taken from ``meta["fp8"]`` (the
    engine's Q/DQ scales), never calibrated anew."""
    overrides = {k: meta["config"][k] for k in ("ref_attention", "ref_rope", "ref_timestep", "ref_t_stride",
                                                  "ref_cross_attention", "quantize")
                 if k in meta["config"]}
    expert, sources = meta["source"].get("expert", 0), dict(meta["source"].get("sources") or {})
    adapter_1 = adapter
    if expert == 1:  # Wan2.2's low-noise expert takes the second adapter; the first one is not exported
        sources["adapter_2"], adapter_1 = str(adapter), None
    return export_onnx(model or meta["source"]["model"], out_dir, adapter=adapter_1, dtype=meta["dtype"],
                       attention=meta["attention"], lora_scale=lora_scale, cache_root=cache_root, expert=expert,
                       sources=sources, fp8_record=meta.get("fp8"), **overrides)


def refit_engine(plan: str | Path, adapter: str | Path, out: str | Path | None = None,
                 model: str | Path | None = None, lora_scale: float | None = None,
                 cache_root: str | Path | None = None) -> Path:
    """Swap the reference-stream LoRA of a refittable ``plan`` for ``adapter``; writes ``out`` (default: in place).

    The base checkpoint is the one the plan was exported from (``model`` overrides it; ``cache_root`` is
    where ``tiny`` is built when that is the model).
    """
    trt = import_tensorrt()
    meta = read_plan_meta(plan)
    if not meta.get("refittable"):
        raise ValueError(f"{plan} was built without --refit; rebuild it with `mvgen export tensorrt --refit`")
    if meta["attention"] == "plugin":
        register_joint_attention_plugin()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(plan).read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialize {plan}")
    with tempfile.TemporaryDirectory(prefix="mvgen_refit_") as tmp:
        onnx_path = refit_onnx(meta, adapter, tmp, model, lora_scale, cache_root)
        refitter = trt.Refitter(engine, logger)
        parser_refitter = trt.OnnxParserRefitter(refitter, logger)
        if not parser_refitter.refit_from_file(str(onnx_path)):
            errors = [str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors)]
            raise RuntimeError(f"refit from {onnx_path} failed: {errors}")
        if not refitter.refit_cuda_engine():
            missing = refitter.get_missing_weights()
            raise RuntimeError(f"TensorRT refused the new weights for {plan} (missing: {missing})")
    out = Path(out or plan)
    out.write_bytes(bytes(engine.serialize()))
    meta["source"] = {**meta["source"], "adapter": str(adapter), "lora_scale": lora_scale}
    plan_meta_path(out).write_text(json.dumps(meta, indent=2))
    return out
