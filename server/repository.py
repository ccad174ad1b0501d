"""Write the Triton model repository: one folder per model with ``config.pbtxt`` and a thin ``1/model.py``.

    mvgen                python, BLS: validate, encoders once, scheduler loop over mvgen_denoiser, decode
    mvgen_stream         the same model, decoupled: one ``progress`` response per step, then the video
    mvgen_text_encoder   umT5, or an MMDiT's Llama + CLIP text (prompt and negative prompt in one call)
    mvgen_image_encoder  CLIP vision states of the conditioning frame (checkpoints with CLIP only)
    mvgen_vae            the family's VAE: I2V condition, reference latents, decode
    mvgen_denoiser       the multi-view DiT, dynamic batching across requests; or a TensorRT plan
    mvgen_denoiser_2     Wan2.2's low-noise expert (two-expert checkpoints only); the loop routes each step
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import protocol
from .call_bounds import CallBounds

from engine.backbones.families import family_of
from engine.denoiser_io import config_specs, denoiser_model_name, text_outputs
from engine.runtime.parallel import ParallelLayout
from engine.warmup import DEFAULT_BUDGET_S, check_mode

GENERATE_MODELS = ("mvgen", "mvgen_stream")
DENOISER = denoiser_model_name(0)
MODEL_CLASSES = {
    "mvgen": "GenerateModel",
    "mvgen_stream": "GenerateModel",
    "mvgen_text_encoder": "TextEncoderModel",
    "mvgen_image_encoder": "ImageEncoderModel",
    "mvgen_vae": "VaeModel",
    DENOISER: "DenoiserModel",
    denoiser_model_name(1): "DenoiserModel",
}
COMPUTE_LOCK = "compute.lock"  # the file the CPU models of a served tree take turns on (server.compute_lock)
# rows per denoiser batch: 4 requests with classifier-free guidance (cond + uncond each)
MAX_BATCH_ROWS = 8

MODEL_PY = '''"""Triton python-backend adapter for `{name}`; the work is `server.models.{cls}` over `engine`."""
import json
import sys

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        extra = config.get("parameters", {{}}).get("python_path", {{}}).get("string_value", "")
        sys.path[:0] = [p for p in extra.split(":") if p and p not in sys.path]
        from server.models import {cls}

        self.model = {cls}(config, pb_utils)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
'''


@dataclass(frozen=True)
class RepositoryOptions:
    """What the generated repository serves and how (``mvgen serve`` flags map onto these)."""

    model: str = "tiny"
    adapter: str | None = None
    # the rest of ``Checkpoint.load``'s sources: adapter_2, loras, loras_2, lora_reference, transformer_file, ...
    sources: dict = field(default_factory=dict)
    dtype: str = "float32"  # or "auto" (engine.checkpoint.default_dtype on this machine's device)
    device: str = "cpu"
    offload: str = "none"  # the denoiser in host memory between batches (engine.runtime.offload.OFFLOAD_MODES)
    vae_tiling: bool | dict = False  # True or VaeTiling's fields: mvgen_vae encodes and decodes in tiles
    scheduler: str = "unipc"
    max_tokens: int = 131_072
    overrides: dict = field(default_factory=dict)
    max_concurrency: int = 8  # requests one mvgen instance generates at once
    max_batch_rows: int = MAX_BATCH_ROWS
    # > 0: pad every denoiser batch to this many rows (the old reproducibility fallback; --deterministic gets it from
    # batch-invariant kernels instead); 0: batches at their real size; None: max_batch_rows
    pad_batch_to: int | None = 0
    batch_delay_us: int = 2000  # how long the dynamic batcher waits for companions
    denoiser_plan: str | None = None  # a TensorRT plan replaces the python denoiser
    reference_cache: bool = True  # the denoiser keeps each request's reference K/V (isolated + zero configs)
    reference_cache_mb: int = 8192  # bound on the reference K/V the denoiser holds at once
    cache_root: str | None = None  # where the embedded tiny checkpoint is built
    sp: int = 1  # sequence-parallel ranks of each denoiser (Ulysses; engine.runtime.parallel): a worker process per other rank
    cfg_parallel: bool = False  # cond and uncond rows on two groups of sp ranks (world = 2 x sp)
    worker_timeout_s: float = 120.0  # a worker silent this long fails the batch; the denoiser is then restarted
    # what each model does at load, before the server reports ready (engine.warmup): "full" (weights resident + one
    # call at the default request), "weights" (resident only) or "none"; bounded by warmup_budget_s per model
    warmup: str = "full"
    warmup_budget_s: float = DEFAULT_BUDGET_S
    # where mvgen serve's supervisor and the models exchange state and fault reports (server.serving_state);
    # None: no supervisor (a repository for a plain tritonserver)
    state_dir: str | None = None
    call_timeout_s: float = 60.0  # the loop's bound on one sub-model call: this base ... (server.call_bounds)
    call_timeout_per_ktoken_s: float = 1.0  # ... plus this per 1000 rows x tokens of the request x requests in flight
    test_hooks: bool = False  # honour the fault-injection request parameter (server.fault_injection): tests only

    @property
    def parallel(self) -> ParallelLayout:
        return ParallelLayout(self.sp, self.cfg_parallel)


def build_repository(dest: str | Path, options: RepositoryOptions = RepositoryOptions()) -> Path:
    """Write the repository into ``dest`` (replacing models of the same names); return ``dest``.

    Raises ``engine.loading.CheckpointError`` when the model directory is not a Wan checkpoint we serve.
    """
    import json

    from engine.checkpoint import Checkpoint
    from engine.loading import find_transformer_dir, transformer_weight_files

    # the whole checkpoint description is read (and refused, in one line) before a server starts
    checkpoint = Checkpoint.load(options.model, options.adapter, **options.sources, dtype=options.dtype,
                                 device=options.device, offload=options.offload, vae_tiling=options.vae_tiling,
                                 scheduler=options.scheduler, max_tokens=options.max_tokens,
                                 cache_root=options.cache_root, **options.overrides)
    path, adapter = checkpoint.path, checkpoint.adapter
    for spec in checkpoint.experts:
        if spec.weights_file is None:
            transformer_weight_files(find_transformer_dir(path, spec.folder))
        for source in (spec.adapter, spec.weights_file, *(lora.path for lora in spec.loras)):
            if source is not None and not Path(source).exists():
                raise FileNotFoundError(f"not found: {source}")
    for spec in checkpoint.experts:  # refused here, before a server starts, in the words the model would use
        options.parallel.check_heads(spec.config.num_attention_heads)
        if options.parallel.parallel and not family_of(spec.config).parallel:
            raise ValueError("sequence/CFG parallel (--sp, --cfg-parallel) is implemented for the Wan family only; "
                             "serve an MMDiT without them")
    check_mode(options.warmup)
    CallBounds(options.call_timeout_s, options.call_timeout_per_ktoken_s)  # refused here, in its own words
    if options.denoiser_plan and options.parallel.parallel:
        raise ValueError("a TensorRT plan runs on one GPU per instance; sequence/CFG parallel (--sp, --cfg-parallel) "
                         "serves the python denoiser: drop --denoiser-plan or --sp/--cfg-parallel")
    if options.denoiser_plan and len(checkpoint.experts) > 1:
        raise ValueError("a TensorRT plan serves one denoiser; this checkpoint has two experts (Wan2.2): serve it "
                         "without --plan")
    if options.denoiser_plan and checkpoint.offload != "none":
        raise ValueError(f"offload {checkpoint.offload!r} moves the python denoiser's weights; a TensorRT plan holds "
                         "its own: drop --denoiser-plan or --offload")
    dtype = str(checkpoint.dtype).removeprefix("torch.")  # "auto" resolved for the device the models run on
    model_type = _model_type(dtype)

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    params = {
        "model": str(path.resolve()), "adapter": str(adapter.resolve()) if adapter else "", "dtype": dtype,
        "device": options.device, "scheduler": options.scheduler, "max_tokens": str(options.max_tokens),
        "overrides": json.dumps(options.overrides), "python_path": str(Path(__file__).resolve().parents[1]),
        "sources": json.dumps(checkpoint.sources()), "offload": checkpoint.offload,
        "vae_tiling": json.dumps(checkpoint.vae_tiling.to_dict()) if checkpoint.vae_tiling else "",
        "python_executable": sys.executable,  # what a parallel denoiser's workers run (engine.runtime.workers)
        "warmup": options.warmup, "warmup_budget_s": str(options.warmup_budget_s),
        # on a CPU the models take turns on the cores (server.compute_lock)
        "compute_lock": str((dest / COMPUTE_LOCK).resolve()) if checkpoint.device.type == "cpu" else "",
        "state_dir": options.state_dir or "", "test_hooks": "true" if options.test_hooks else "false",
    }
    for name in GENERATE_MODELS:
        _write_python_model(dest, name, _generate_config(name, params, options))
    # the text encoder answers the family's text inputs of the denoiser, each [N, ...] in the denoiser's type
    text_specs = [spec for spec in config_specs(checkpoint.config) if spec.name in text_outputs(checkpoint.config)]
    _write_python_model(dest, "mvgen_text_encoder", _config(
        "mvgen_text_encoder", [_tensor("prompt", "TYPE_STRING", [-1])],
        [_tensor(s.name, "TYPE_FP32" if s.dtype == "float32" else model_type, [-1] * len(s.dims)) for s in text_specs],
        params))
    if checkpoint.has_image_encoder:
        _write_python_model(dest, "mvgen_image_encoder", _config(
            "mvgen_image_encoder", [_tensor("frame", "TYPE_UINT8", [-1, -1, 3])],
            [_tensor("image_context", model_type, [-1, -1, -1])], params))
    _write_python_model(dest, "mvgen_vae", _config(
        "mvgen_vae",
        [_tensor("frame", "TYPE_UINT8", [-1, -1, 3], True), _tensor("known", "TYPE_FP32", [-1, -1], True),
         _tensor("num_frames", "TYPE_INT32", [1], True), _tensor("references", "TYPE_UINT8", [-1, -1, -1, 3], True),
         _tensor("latents", "TYPE_FP32", [1, checkpoint.latent_channels, -1, -1, -1], True)],
        [_tensor("condition", "TYPE_FP32", [1, checkpoint.config.condition_channels or -1, -1, -1, -1]),
         _tensor("ref_latents", "TYPE_FP32", [1, -1, checkpoint.latent_channels, -1, -1]),
         _tensor("video", "TYPE_UINT8", [-1, -1, -1, 3])], params))
    for expert, spec in enumerate(checkpoint.experts):
        _write_denoiser(dest, denoiser_model_name(expert), spec.config, {**params, "expert": str(expert)}, options)
    served = {*GENERATE_MODELS, "mvgen_text_encoder", "mvgen_vae",
              *(denoiser_model_name(e) for e in range(len(checkpoint.experts)))}
    served |= {"mvgen_image_encoder"} if checkpoint.has_image_encoder else set()
    for name in set(MODEL_CLASSES) - served:  # left by a repository of another kind of checkpoint
        if (dest / name / "config.pbtxt").is_file():
            shutil.rmtree(dest / name)
    return dest


def _write_denoiser(dest: Path, name: str, config, params: dict, options: RepositoryOptions) -> None:
    """The denoiser's I/O comes from ``engine.denoiser_io`` (shared with the ONNX exporter and TensorRT builder)."""
    from engine.denoiser_io import STEP_INPUTS, config_specs, output_spec

    io_dtype = _model_type(params["dtype"])
    inputs = [_spec_tensor(s, io_dtype) for s in config_specs(config)]
    # the python denoiser keeps a request's step-invariant inputs (inputs_once): its later steps send the
    # STEP_INPUTS alone, so the others are optional there (a TensorRT plan takes every input at every call)
    kept = [_spec_tensor(s, io_dtype, optional=s.name not in STEP_INPUTS) for s in config_specs(config)]
    outputs = [_spec_tensor(output_spec(config), io_dtype)]
    batching = f"dynamic_batching {{ max_queue_delay_microseconds: {options.batch_delay_us} }}"
    if options.denoiser_plan:
        folder = _fresh(dest / name)
        shutil.copyfile(options.denoiser_plan, folder / "1" / "model.plan")
        text = _config(name, inputs, outputs, {}, backend='platform: "tensorrt_plan"', kind="KIND_GPU",
                       max_batch_size=options.max_batch_rows, extra=batching)
        (folder / "config.pbtxt").write_text(text)
        return
    pad = options.max_batch_rows if options.pad_batch_to is None else options.pad_batch_to
    _write_python_model(dest, name, _config(
        name, kept, outputs, {**params, "pad_batch_to": str(pad), "cache_bytes": str(options.reference_cache_mb << 20),
                                "sp": str(options.sp), "cfg_parallel": "true" if options.cfg_parallel else "false",
                                "worker_timeout_s": str(options.worker_timeout_s)},
        max_batch_size=options.max_batch_rows,
        extra=batching))


def _model_type(dtype: str) -> str:
    """The Triton type of tensors in the model's dtype (the denoiser's I/O, encoder states)."""
    import torch

    from engine.denoiser_io import TRITON_DTYPES

    return TRITON_DTYPES[getattr(torch, dtype)]


def _generate_config(name: str, params: dict, options: RepositoryOptions) -> str:
    inputs = [_tensor(f.name, f.triton_type, list(f.dims), f.optional) for f in protocol.INPUTS]
    outputs = [_tensor(f.name, f.triton_type, list(f.dims)) for f in protocol.OUTPUTS
               if f.name != "progress" or name == "mvgen_stream"]
    extra = "model_transaction_policy { decoupled: true }" if name == "mvgen_stream" else ""
    loop = {"max_concurrency": str(options.max_concurrency), "call_timeout_s": str(options.call_timeout_s),
            "call_timeout_per_ktoken_s": str(options.call_timeout_per_ktoken_s),
            "reference_cache": "true" if options.reference_cache and not options.denoiser_plan else "false",
            # a TensorRT plan keeps nothing between calls, and takes every input at every call
            "request_cache": "false" if options.denoiser_plan else "true",
            "denoiser_plan": "true" if options.denoiser_plan else "false"}
    return _config(name, inputs, outputs, {**params, **loop}, extra=extra)


def _spec_tensor(spec, io_dtype: str, optional: bool = False) -> str:
    dtype = "TYPE_FP32" if spec.dtype == "float32" else io_dtype
    dims = [d if isinstance(d, int) else -1 for d in spec.dims[1:]]  # the batch axis is Triton's
    if not dims:  # a per-row scalar ([batch]): one element per row on the wire
        return _tensor(spec.name, dtype, [1], optional, reshape=[])
    return _tensor(spec.name, dtype, dims, optional)


def _tensor(name: str, dtype: str, dims: list[int], optional: bool = False, reshape: list[int] | None = None) -> str:
    parts = [f'name: "{name}"', f"data_type: {dtype}", f"dims: [ {', '.join(map(str, dims))} ]"]
    if reshape is not None:
        parts.append(f"reshape: {{ shape: [ {', '.join(map(str, reshape))} ] }}")
    if optional:
        parts.append("optional: true")
    return "{ " + " ".join(parts) + " }"


def _config(name: str, inputs: list[str], outputs: list[str], params: dict, *, backend: str = 'backend: "python"',
            kind: str = "KIND_CPU", max_batch_size: int = 0, extra: str = "") -> str:
    lines = [f'name: "{name}"', backend, f"max_batch_size: {max_batch_size}",
             "input [\n  " + ",\n  ".join(inputs) + "\n]", "output [\n  " + ",\n  ".join(outputs) + "\n]",
             f"instance_group [ {{ kind: {kind} count: 1 }} ]"]
    if extra:
        lines.append(extra)
    for key, value in params.items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: {_quote(value)} }} }}')
    return "\n".join(lines) + "\n"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "1").mkdir(parents=True)
    return folder


def _write_python_model(dest: Path, name: str, config_text: str) -> None:
    folder = _fresh(dest / name)
    (folder / "config.pbtxt").write_text(config_text)
    (folder / "1" / "model.py").write_text(MODEL_PY.format(name=name, cls=MODEL_CLASSES[name]))
