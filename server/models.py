"""The served models' bodies: tensors in and out of Triton's python backend over ``engine``'s components.

Each ``1/model.py`` of the generated repository builds one of these classes with the backend's
``triton_python_backend_utils`` module (``pb``), which only exists inside the stub process. Each model
loads only its own component of the checkpoint (``engine.checkpoint``); the loop model loads none and runs
``engine.generation.generate`` over ``RemoteStages``, which turn each stage into a BLS call. Nothing here
computes: it parses, calls, and answers.
"""
from __future__ import annotations

import copy
import gc
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as WaitTimeout

import numpy as np
import torch

from engine import generation, warmup
from engine.checkpoint import Checkpoint
from engine.runtime.denoiser import DenoiseCall, Denoiser
from engine.backbones.wan.components import ImageEncoder
from engine.backbones.registry import text_encoder_class, vae_class
from engine.denoiser_io import denoiser_model_name, mode_specs, step_only, text_outputs
from engine.errors import MISS_PREFIX, ReferenceCacheMiss, RequestError, WorkersLost
from engine.generation import DENOISER_INPUTS, Cancelled
from engine.runtime.parallel import ParallelLayout
from engine.runtime.workers import DistributedDenoiser
from engine.request import make_request

from . import fault_injection, protocol
from .call_bounds import CallBounds, request_work
from .compute_lock import ComputeLock
from .freed_memory import return_freed_memory
from .metrics import BatchMetrics, LoopMetrics, WorkerHealth
from .serving_state import StateDirectory

# BLS request parameters of the denoiser model: the request's reference-cache key, and "drop it now"
CACHE_KEY, RELEASE = "mvgen_cache_key", "mvgen_release"
CACHE_REFERENCES = "mvgen_cache_references"  # "false": the request's reference stream is recomputed every step
OOM_PREFIX = "out of memory"  # how a model's answer to a call that ran out of device memory begins
UNHEALTHY = "is not healthy"  # Triton's python backend, on a call to a model whose stub died or stopped
UNLOADED = "Request for unknown model"  # Triton, on a call to a model that is not loaded (or not ready)


class SubModelFailure(RuntimeError):
    """A sub-model could not answer a request's call: it died or hung (it is being restored), is being restored, or
    ran out of memory on this request. The message is the one line the client gets."""


def _parameters(model_config: dict) -> dict[str, str]:
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


def load_checkpoint(model_config: dict) -> Checkpoint:
    """The checkpoint description from the ``config.pbtxt`` parameters the repository generator wrote."""
    params = _parameters(model_config)
    return Checkpoint.load(
        params["model"], params.get("adapter") or None, **json.loads(params.get("sources", "{}")),
        dtype=params.get("dtype", "float32"), device=params.get("device", "cpu"),
        scheduler=params.get("scheduler", "unipc"), max_tokens=int(params.get("max_tokens", "131072")),
        offload=params.get("offload", "none"), vae_tiling=json.loads(params.get("vae_tiling") or "null"),
        **json.loads(params.get("overrides", "{}")),
    )


def _warm_up(pb, name: str, model_config: dict, warm, *args, **kwargs) -> None:
    """Run ``warm`` (an ``engine.warmup`` function) as the repository's ``warmup`` parameter says, before the model
    reports ready; one INFO line in the server log with what it did and the seconds it took."""
    params = _parameters(model_config)
    report = warm(*args, mode=params.get("warmup", "full"),
                  budget_s=float(params.get("warmup_budget_s", warmup.DEFAULT_BUDGET_S)), **kwargs)
    pb.Logger.log_info(f"{name}: {report.line()}")


def _input(pb, request, name: str):
    tensor = pb.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _torch_input(pb, request, name: str) -> torch.Tensor | None:
    tensor = pb.get_input_tensor_by_name(request, name)
    return None if tensor is None else torch.from_dlpack(tensor.to_dlpack())


def _out(pb, name: str, value) -> object:
    if isinstance(value, torch.Tensor):
        return pb.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous()))
    return pb.Tensor(name, np.ascontiguousarray(value))


def _request_parameters(request) -> dict:
    return json.loads(request.parameters() or "{}")


def _call_fault(model_config: dict, request) -> tuple[str, int] | None:
    """The test fault a BLS call asks for (``server.fault_injection``), honoured under ``--test-hooks`` only."""
    if _parameters(model_config).get("test_hooks") != "true":
        return None
    return fault_injection.call_fault(_request_parameters(request).get(fault_injection.CALL_FAULT))


def _under_fault(fault: tuple[str, int] | None, run):
    """``run()``, or ``run()`` under a test fault: never answering, or every forward running out of memory."""
    if fault is None:
        return run()
    kind, ballast_mb = fault
    if kind == "hang":
        fault_injection.hang()
    with fault_injection.out_of_memory(ballast_mb):
        return run()


def _out_of_memory(model: str, error: BaseException) -> str:
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"{OOM_PREFIX} in {model}: {detail}"


def _free_after_out_of_memory() -> None:
    """What a call that ran out of memory held goes back: its frames (reachable from the error's traceback, which
    can form a cycle with them, hence the collection), the CUDA allocator's cached blocks, the heap's free pages."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    return_freed_memory()


class _PerRequestModel:
    """A model that answers each request on its own; a bad request gets an error, the batch goes on."""

    name = ""
    warm = None  # the component's ``engine.warmup`` function, run before the model reports ready

    def __init__(self, model_config: dict, pb):
        self.pb = pb
        self.model_config = model_config
        self.lock = ComputeLock(_parameters(model_config).get("compute_lock") or None)
        checkpoint = load_checkpoint(model_config)
        self.component = self.load(checkpoint)
        _warm_up(pb, self.name, model_config, self.warm, self.component, checkpoint)

    def load(self, checkpoint: Checkpoint):
        raise NotImplementedError

    def execute(self, requests):
        responses, out_of_memory = [], False
        for request in requests:
            try:
                wanted, fault = set(request.requested_output_names()), _call_fault(self.model_config, request)
                with self.lock:
                    outputs = _under_fault(fault, lambda: self.run(request, wanted))
                responses.append(self.pb.InferenceResponse(output_tensors=[_out(self.pb, k, v) for k, v in outputs.items()]))
            except (RequestError, ValueError) as error:
                responses.append(self.pb.InferenceResponse(error=self.pb.TritonError(f"{self.name}: {error}")))
            except torch.OutOfMemoryError as error:  # this request's problem: answered, its memory given back
                responses.append(self.pb.InferenceResponse(error=self.pb.TritonError(_out_of_memory(self.name, error))))
                out_of_memory = True
        if out_of_memory:
            _free_after_out_of_memory()
        return responses

    def run(self, request, wanted: set[str]) -> dict:
        raise NotImplementedError

    def finalize(self):
        self.component = None
        self.lock.close()


class TextEncoderModel(_PerRequestModel):
    """``prompt`` BYTES [N] (prompt, then the negative prompt under guidance) -> the family's text inputs
    (``denoiser_io.text_outputs``): ``text`` [N, 512, text_dim]; an MMDiT's ``text`` [N, 256, text_dim],
    ``text_mask`` [N, 256] and ``pooled_text`` [N, pooled_projection_dim]."""

    name = "mvgen_text_encoder"
    warm = staticmethod(warmup.warm_text_encoder)

    def load(self, checkpoint):
        return text_encoder_class(checkpoint)(checkpoint)

    def run(self, request, wanted):
        try:
            texts = [bytes(t).decode("utf-8") for t in _input(self.pb, request, "prompt").reshape(-1)]
        except UnicodeDecodeError:
            raise ValueError("'prompt' is not valid UTF-8 text") from None
        if len(texts) not in (1, 2):
            raise ValueError(f"'prompt' must hold 1 or 2 strings, got {len(texts)}")
        return self.component(texts)


class ImageEncoderModel(_PerRequestModel):
    """``frame`` UINT8 [H, W, 3] (the conditioning frame at video size) -> ``image_context`` [1, 257, image_dim]."""

    name = "mvgen_image_encoder"
    load = ImageEncoder
    warm = staticmethod(warmup.warm_image_encoder)

    def run(self, request, wanted):
        return {"image_context": self.component(_input(self.pb, request, "frame"))}


class VaeModel(_PerRequestModel):
    """Encode the I2V condition (``frame`` + ``known`` + ``num_frames`` -> ``condition``), encode references
    (``references`` UINT8 [R, H, W, 3] -> ``ref_latents`` [1, R, 16, H/8, W/8]) or decode (``latents`` ->
    ``video`` UINT8 [F, H, W, 3]); the requested outputs choose."""

    name = "mvgen_vae"
    warm = staticmethod(warmup.warm_vae)

    def load(self, checkpoint):
        return vae_class(checkpoint)(checkpoint)

    def run(self, request, wanted):
        pb, vae, out = self.pb, self.component, {}
        if "condition" in wanted:
            num_frames = int(_input(pb, request, "num_frames").reshape(-1)[0])
            out["condition"] = vae.encode_condition(_input(pb, request, "frame"), _input(pb, request, "known"), num_frames)
        if "ref_latents" in wanted:
            out["ref_latents"] = vae.encode_references(_input(pb, request, "references"))
        if "video" in wanted:
            out["video"] = vae.decode(_torch_input(pb, request, "latents"))
            return_freed_memory()  # a request's last VAE call: its activations go back (server.freed_memory)
        return out


class DenoiserModel:
    """One expert's denoiser call per dynamic batch (``engine.checkpoint.Denoiser.run``), and the reference
    caches of the requests in flight, keyed by the ``mvgen_cache_key`` request parameter. A Wan2.2 checkpoint
    is served as two of these (``mvgen_denoiser``, ``mvgen_denoiser_2``): each expert batches on its own."""

    def __init__(self, model_config: dict, pb):
        self.pb = pb
        self.name = model_config["name"]
        self.model_config = model_config
        params = _parameters(model_config)
        self.state = StateDirectory(params.get("state_dir") or None)
        checkpoint, expert = load_checkpoint(model_config), int(params.get("expert", "0"))
        cache_bytes = int(params.get("cache_bytes", 8 << 30))
        layout = ParallelLayout(int(params.get("sp", "1")), params.get("cfg_parallel") == "true")
        self.metrics = BatchMetrics(pb, self.name)
        if layout.parallel:  # a leader and its workers; the launcher reloads this model when they are lost
            self.health = WorkerHealth(pb, self.name)
            self.denoiser = DistributedDenoiser(checkpoint, expert, cache_bytes, layout,
                                                float(params.get("worker_timeout_s", "120")),
                                                on_lost=self._workers_lost,
                                                python=params.get("python_executable") or sys.executable,
                                                resident_workers=params.get("warmup", "full") != "none")
            self.health.set(True)
        else:
            self.denoiser = Denoiser(checkpoint, expert, cache_bytes=cache_bytes)
        self.pad_to = int(params.get("pad_batch_to", "0"))
        self.lock = ComputeLock(params.get("compute_lock") or None)
        _warm_up(pb, self.name, model_config, warmup.warm_denoiser, self.denoiser, checkpoint, expert,
                 pad_to=self.pad_to)

    def _workers_lost(self, reason: str) -> None:
        """A parallel denoiser's worker is gone: the gauge drops and the supervisor reloads this model."""
        self.health.lost(reason)
        self.state.report(self.name, f"its workers are lost ({reason})", kill=False)

    def execute(self, requests):
        caches = self.denoiser.caches
        builds = caches.builds
        responses = self._execute(requests)
        self.metrics.observe_caches(caches.builds - builds, len(caches), caches.nbytes)
        return responses

    def _execute(self, requests):
        calls, steps, faults, responses = [], [], [], [None] * len(requests)
        for i, request in enumerate(requests):
            params = _request_parameters(request)
            key = params.get(CACHE_KEY)
            if params.get(RELEASE):
                try:
                    self.denoiser.release(key)
                    return_freed_memory()  # a request ended: its steps' activations go back (server.freed_memory)
                    responses[i] = self._answer(_torch_input(self.pb, request, "latents").new_zeros(0))
                except WorkersLost as error:
                    responses[i] = self._answer(error)
                continue
            inputs = {name: _torch_input(self.pb, request, name) for name in DENOISER_INPUTS}
            inputs["timestep"] = inputs["timestep"].reshape(-1)
            calls.append(DenoiseCall(inputs, key, params.get(CACHE_REFERENCES, True)))
            steps.append(i)
            faults.append(_call_fault(self.model_config, request))
        if calls:
            self.metrics.observe_batch(sum(c.inputs["latents"].shape[0] for c in calls), len(calls))
        try:
            with self.lock:
                results = self._run(calls, faults)
        except WorkersLost as error:  # every request of the batch fails with it; the server reloads this model
            results = [error] * len(calls)
        for i, response in zip(steps, [self._answer(result) for result in results]):
            responses[i] = response
        out_of_memory = any(isinstance(result, torch.OutOfMemoryError) for result in results)
        results = None  # the errors' tracebacks hold what the failed forward allocated
        if out_of_memory:
            _free_after_out_of_memory()
        return responses

    def _run(self, calls: list[DenoiseCall], faults: list) -> list:
        """``Denoiser.run`` (a failed call, out of memory included, releases its request's caches there); a call
        with a test fault (``server.fault_injection``) runs apart, under it."""
        plain = [i for i, fault in enumerate(faults) if fault is None]
        results = [None] * len(calls)
        if plain:
            for i, result in zip(plain, self.denoiser.run([calls[i] for i in plain], self.pad_to)):
                results[i] = result
        for i, fault in enumerate(faults):
            if fault is not None:
                results[i] = _under_fault(fault, lambda: self.denoiser.run([calls[i]], self.pad_to))[0]
        return results

    def _answer(self, result):
        pb = self.pb
        if isinstance(result, torch.OutOfMemoryError):
            return pb.InferenceResponse(error=pb.TritonError(_out_of_memory(self.name, result)))
        if isinstance(result, Exception):
            return pb.InferenceResponse(error=pb.TritonError(f"{self.name}: {type(result).__name__}: {result}"))
        return pb.InferenceResponse(output_tensors=[_out(pb, "velocity", result)])

    def finalize(self):
        if isinstance(self.denoiser, DistributedDenoiser):
            self.denoiser.close()
        self.denoiser = None
        self.lock.close()


class RemoteStages:
    """``engine.generation.Stages`` over BLS calls to the encoder, VAE and denoiser models.

    Every call waits at most its bound (``server.call_bounds``); one that fails because its model died or hung
    fails the request with one line naming the model (``SubModelFailure``) and is reported to the supervisor
    (``server.serving_state``), which restores the model. ``for_request`` gives one request's view: its bound and
    its test fault (``server.fault_injection``)."""

    def __init__(self, pb, checkpoint: Checkpoint, caches_references: bool, caches_requests: bool,
                 metrics: LoopMetrics | None = None, state: StateDirectory | None = None,
                 bound_s=lambda: CallBounds().base_s, denoiser_plan: bool = False):
        self.pb = pb
        self.denoiser_plan = denoiser_plan  # a TensorRT plan: every input of its graph at every call, none optional
        self.metrics = metrics  # the loop's: bytes sent to the denoiser per call
        self.checkpoint = checkpoint
        self.caches_references = caches_references
        self.caches_requests = caches_requests
        # the denoiser's mode inputs, fixed by the checkpoint: derived once, not at every step's call
        self.mode_specs = mode_specs(checkpoint.config.to_dict())
        self.state = state or StateDirectory(None)
        self.bound_s = bound_s  # () -> seconds one call may take
        self.fault: fault_injection.Fault | None = None
        self.calls: dict[str, int] = {}  # calls made to each model (this request's, in a ``for_request`` view)
        self.suspects: set[str] = set()  # models found dead or hung, until a call to them succeeds again
        # BLS calls run here, so the loop can stop waiting: a hung model blocks a thread of it until it is killed
        self.waiters = ThreadPoolExecutor(max_workers=64, thread_name_prefix="mvgen-bls")

    def for_request(self, bound_s, fault: fault_injection.Fault | None = None) -> "RemoteStages":
        view = copy.copy(self)
        view.bound_s, view.fault, view.calls = bound_s, fault, {}
        return view

    def _call(self, model: str, inputs: dict, outputs: list[str], parameters: dict | None = None) -> list:
        """The call's outputs, within its bound: a model being restored is waited for (a cache it lost is then
        missing, and the loop sends everything again), one that dies or hangs meanwhile fails the request."""
        pb = self.pb
        parameters = {**(parameters or {}), **self._fault_parameter(model)}
        tensors = [_out(pb, name, value) for name, value in inputs.items() if value is not None]
        bound = self.bound_s()
        deadline = time.monotonic() + bound
        for attempt in range(2):
            self._await_restored(model, deadline, bound)
            request = pb.InferenceRequest(model_name=model, inputs=tensors, requested_output_names=outputs,
                                          parameters=parameters)
            started = time.time()
            try:
                response = self.waiters.submit(request.exec).result(timeout=max(0.0, deadline - time.monotonic()))
            except WaitTimeout:
                raise self._lost(model, f"no answer within {bound:.1f} s, the bound of this request's calls",
                                 started) from None
            if not response.has_error():
                self.suspects.discard(model)
                return [torch.from_dlpack(pb.get_output_tensor_by_name(response, name).to_dlpack()).clone()
                        for name in outputs]
            message = response.error().message().strip()
            if MISS_PREFIX in message:
                raise ReferenceCacheMiss(parameters.get(CACHE_KEY, ""))
            if OOM_PREFIX in message:
                raise SubModelFailure(f"{message}; the request was dropped and what it held freed, the server goes "
                                      "on: retry with fewer frames, a smaller size or fewer references")
            if UNHEALTHY in message:
                raise self._lost(model, f"its process died or stopped ({message.rstrip('.')})", started)
            if attempt == 0 and UNLOADED in message and model in self.state.read_state().down:
                continue  # unloaded for its restoration as the call went out: wait for it, then once more
            raise RuntimeError(f"{model}: {message}")

    def _await_restored(self, model: str, deadline: float, bound: float) -> None:
        """Return once ``model`` is not being restored (``server.serving_state``); fail at ``deadline``."""
        while True:
            down = self.state.read_state().down.get(model)
            if down is None:
                return
            if time.monotonic() >= deadline:
                raise SubModelFailure(f"{model} is being restored ({down}) and was not back within {bound:.1f} s, "
                                      "the bound of this request's calls; retry in a few seconds")
            time.sleep(0.1)

    def _lost(self, model: str, reason: str, started: float) -> SubModelFailure:
        """``model`` died or hung: the supervisor is told (it kills and restores it); the request's one line."""
        self.suspects.add(model)
        self.state.report(model, reason, kill=True, at=started)
        return SubModelFailure(f"{model} failed: {reason}; it is being restarted, retry the request")

    def _fault_parameter(self, model: str) -> dict:
        self.calls[model] = self.calls.get(model, 0) + 1
        fault = self.fault
        if fault is None or fault.model != model or fault.call != self.calls[model]:
            return {}
        return {fault_injection.CALL_FAULT: fault.call_parameter()}

    def encode_text(self, texts):
        names = list(text_outputs(self.checkpoint.config))
        prompts = np.array([t.encode("utf-8") for t in texts], dtype=object)
        return dict(zip(names, self._call("mvgen_text_encoder", {"prompt": prompts}, names)))

    def encode_image(self, frame):
        return self._call("mvgen_image_encoder", {"frame": frame}, ["image_context"])[0]

    def encode_condition(self, frame, known, num_frames):
        inputs = {"frame": frame, "known": known.astype(np.float32), "num_frames": np.array([num_frames], np.int32)}
        return self._call("mvgen_vae", inputs, ["condition"])[0]

    def encode_references(self, images):
        return self._call("mvgen_vae", {"references": images}, ["ref_latents"])[0]

    def denoise(self, inputs, cache_key, expert, cache_references):
        inputs = self._wire(inputs)
        if self.metrics is not None:
            self.metrics.observe_denoiser_call(sum(t.numel() * t.element_size() for t in inputs.values() if t is not None))
        return self._call(denoiser_model_name(expert), inputs, ["velocity"],
                          {CACHE_KEY: cache_key, CACHE_REFERENCES: cache_references} if cache_key else None)[0]

    def release(self, cache_key):
        """To each expert that caches: a one-row, one-cell request that only carries the release flag and the
        step inputs (the others are optional; the denoiser answers it at once). Not to an expert found dead or
        hung (its caches went with it), and a failure here leaves the request's own outcome as it was."""
        down = self.state.read_state().down
        for expert, spec in enumerate(self.checkpoint.experts):
            model = denoiser_model_name(expert)
            if spec.config.caches_requests and model not in self.suspects and model not in down:
                zeros = {"latents": torch.zeros(1, self.checkpoint.latent_channels, 1, 2, 2, dtype=self.checkpoint.dtype),
                         "timestep": torch.zeros(1, 1)}
                try:
                    self._call(model, zeros, ["velocity"], {CACHE_KEY: cache_key, RELEASE: True})
                except SubModelFailure as error:
                    self.pb.Logger.log_warn(f"releasing request {cache_key}'s caches: {error}")

    def decode(self, latents):
        return self._call("mvgen_vae", {"latents": latents.float()}, ["video"])[0].numpy()

    def _wire(self, inputs: dict) -> dict:
        """R = 0 travels as an empty reference axis (Triton inputs keep one shape per batch), and so does a mode
        input the request lacks (the model declares it: ``denoiser_io.mode_specs``); the timestep as one value
        per row; a TensorRT plan's TI2V condition as zeros when the request has no first frame (the plan has no
        optional input). A step that carries the ``STEP_INPUTS`` only (``inputs_once``; no text) sends those alone:
        the other inputs are optional in the denoiser's config."""
        if step_only(inputs):
            return {"latents": inputs["latents"], "timestep": inputs["timestep"].reshape(-1, 1).float()}
        inputs = dict(inputs)
        b, _, f, h, w = inputs["latents"].shape
        if inputs["ref_latents"] is None:
            inputs["ref_latents"] = inputs["latents"].new_zeros(b, 0, inputs["latents"].shape[1], h, w)
        config = self.checkpoint.config
        if self.denoiser_plan and inputs["condition"] is None and config.condition_optional:
            # TI2V text-to-video: the graph's condition with nothing known is the call without one (its per-token
            # timesteps all the step's; tests/export/test_onnx_ti2v.py)
            inputs["condition"] = inputs["latents"].new_zeros(b, config.condition_channels, f, h, w)
        for spec in self.mode_specs:
            if inputs.get(spec.name) is None:
                sizes = dict(batch=b, frames=0, refs=0, identity_len=0, height=h, width=w, ref_height=h, ref_width=w)
                dtype = torch.float32 if spec.dtype == "float32" else self.checkpoint.dtype
                inputs[spec.name] = torch.zeros(spec.shape(sizes), dtype=dtype)
        inputs["timestep"] = inputs["timestep"].reshape(-1, 1).float()
        return inputs


class GenerateModel:
    """``mvgen`` (unary) and ``mvgen_stream`` (decoupled): validate, then run the loop on a worker thread.

    ``execute`` returns at once; each request is answered through its response sender, so one instance
    serves up to ``max_concurrency`` requests at a time and their denoiser steps can batch together.
    """

    def __init__(self, model_config: dict, pb):
        self.pb = pb
        self.name = model_config["name"]
        self.decoupled = model_config.get("model_transaction_policy", {}).get("decoupled", False)
        params = _parameters(model_config)
        torch.set_num_threads(1)  # the loop's own math is tiny; the cores belong to the models it calls
        self.checkpoint = load_checkpoint(model_config)
        # import and build the scheduler once now: its first import (diffusers) costs ~180 MB and seconds that
        # would otherwise land on the first request
        self.checkpoint.make_scheduler(self.checkpoint.defaults["shift"]).set_timesteps(2)
        # the loop's own first-request costs (image decoding, validation, scheduler steps), over stages answering zeros
        _warm_up(pb, self.name, model_config, warmup.warm_loop, self.checkpoint)
        caches = params.get("reference_cache", "true") == "true" and any(
            e.config.caches_reference for e in self.checkpoint.experts)
        requests = params.get("request_cache", "true") == "true" and any(
            e.config.caches_requests for e in self.checkpoint.experts)
        self.metrics = LoopMetrics(pb, self.name)
        self.state = StateDirectory(params.get("state_dir") or None)
        self.bounds = CallBounds(float(params.get("call_timeout_s", "60")),
                                 float(params.get("call_timeout_per_ktoken_s", "1")))
        self.test_hooks = params.get("test_hooks") == "true"
        self.stages = RemoteStages(pb, self.checkpoint, caches, requests, self.metrics, self.state,
                                   lambda: self.bounds.base_s, params.get("denoiser_plan") == "true")
        # the models a request needs: it is refused at once while one of them is being restored
        encoders = ("mvgen_text_encoder", "mvgen_image_encoder")[:2 if self.checkpoint.has_image_encoder else 1]
        self.needed = (*encoders, "mvgen_vae", *(denoiser_model_name(e) for e in range(len(self.checkpoint.experts))))
        self.in_flight = 0  # requests accepted and not answered (their calls share the sub-models' queues)
        self._count = threading.Lock()
        self.state.set_in_flight(self.name, 0)
        self.pool = ThreadPoolExecutor(max_workers=int(params.get("max_concurrency", "8")),
                                       thread_name_prefix=self.name)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            refusal = self.state.read_state().refusal(self.needed)
            if refusal is not None:  # draining, or a model it needs is being restored: say so now
                self.metrics.request_refused()
                self._fail(sender, refusal, self.pb.TritonError.UNAVAILABLE)
                continue
            self._admitted(1)
            self.metrics.request_queued()
            future = self.pool.submit(self._serve, request, sender, time.perf_counter())
            future.add_done_callback(self._log_crash)
        return None

    def _admitted(self, change: int) -> None:
        with self._count:
            self.in_flight += change
            self.state.set_in_flight(self.name, self.in_flight)

    def _stages_for(self, request, generation_request) -> RemoteStages:
        """The request's view of the stages: its calls' bound (``server.call_bounds``) and, under ``--test-hooks``,
        the fault its ``mvgen_fault`` parameter asks for."""
        work = request_work(self.checkpoint, generation_request)
        fault = None
        wanted = _request_parameters(request).get(fault_injection.FAULT_PARAMETER) if self.test_hooks else None
        if wanted:
            try:
                fault = fault_injection.Fault.parse(wanted)
            except ValueError as error:
                raise RequestError(str(error)) from None
        return self.stages.for_request(lambda: self.bounds.bound_s(work, self.in_flight), fault)

    def _log_crash(self, future) -> None:
        error = future.exception()
        if error is not None:
            self.pb.Logger.log_error(f"{self.name}: worker crashed: {type(error).__name__}: {error}")

    def _serve(self, request, sender, arrived: float):
        pb = self.pb
        outcome = "error"
        waiting = [True]  # counted in the loop's queue gauge until its first denoiser step (or its end)

        def on_prepared():
            waiting[0] = False
            self.metrics.request_dequeued()

        try:
            self.metrics.request_started(time.perf_counter() - arrived)
            arguments = protocol.request_arguments(lambda name: _input(pb, request, name))
            generation_request = make_request(self.checkpoint.defaults, self.checkpoint.limits, **arguments)
            stages = self._stages_for(request, generation_request)

            def on_step(step, total, seconds):
                self.metrics.observe_step(seconds)
                if self.decoupled:
                    sender.send(pb.InferenceResponse(output_tensors=[_out(pb, "progress", np.array([step, total], np.int32))]))

            video = generation.generate(self.checkpoint, generation_request, stages, on_step, request.is_cancelled,
                                        on_prepared=on_prepared)
            outputs = [_out(pb, "video", video)]
            if self.decoupled:
                steps = generation_request.steps
                outputs.append(_out(pb, "progress", np.array([steps, steps], np.int32)))
            sender.send(pb.InferenceResponse(output_tensors=outputs), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            outcome = "success"
        except Cancelled:
            outcome = "cancelled"
            self._fail(sender, "request cancelled", pb.TritonError.CANCELLED)
        except RequestError as error:
            outcome = "rejected"
            self._fail(sender, str(error), pb.TritonError.INVALID_ARG)
        except SubModelFailure as error:  # a sub-model died, hung, is being restored or ran out of memory
            pb.Logger.log_error(f"{self.name}: {error}")
            self._fail(sender, str(error), pb.TritonError.UNAVAILABLE)
        except Exception as error:  # a bug or a failed sub-model: answer, log, keep serving
            pb.Logger.log_error(f"{self.name}: {type(error).__name__}: {error}")
            self._fail(sender, f"internal error: {type(error).__name__}: {error}", pb.TritonError.INTERNAL)
        finally:
            self._admitted(-1)  # answered: first, so that a loop lost right after has nothing in flight
            if waiting[0]:
                self.metrics.request_dequeued()
            self.metrics.request_finished(outcome)

    def _fail(self, sender, message: str, code) -> None:
        """Answer with an error; when the client is gone, still close the stream so the request is released."""
        pb = self.pb
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            sender.send(pb.InferenceResponse(error=pb.TritonError(message, code)), flags=final)
        except Exception as error:
            pb.Logger.log_warn(f"{self.name}: could not send the error response ({error}); closing the stream")
            try:
                sender.send(flags=final)
            except Exception as again:
                pb.Logger.log_warn(f"{self.name}: could not close the stream: {again}")

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.stages.waiters.shutdown(wait=False, cancel_futures=True)  # a call left waiting on a hung model
