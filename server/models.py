"""The served models' bodies: tensors in and out of Triton's python backend, the work in ``server.stages``.

Each ``1/model.py`` in the generated repository is a thin adapter that builds one of these classes with
the backend's ``triton_python_backend_utils`` module (``pb``), which only exists inside the stub process.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from engine.errors import RequestError

from . import protocol, stages
from .metrics import BatchMetrics, LoopMetrics


def _parameters(model_config: dict) -> dict[str, str]:
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


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


class _PerRequestModel:
    """A model that answers each request on its own; a bad request gets an error, the batch goes on."""

    name = ""

    def __init__(self, model_config: dict, pb):
        self.pb = pb
        self.pipe = stages.ServedModel.from_parameters(model_config.get("parameters", {})).load(self.name)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                outputs = self.run(request, set(request.requested_output_names()))
                responses.append(self.pb.InferenceResponse(output_tensors=[_out(self.pb, k, v) for k, v in outputs.items()]))
            except (RequestError, ValueError) as error:
                responses.append(self.pb.InferenceResponse(error=self.pb.TritonError(f"{self.name}: {error}")))
        return responses

    def run(self, request, wanted: set[str]) -> dict:
        raise NotImplementedError

    def finalize(self):
        self.pipe = None


class TextEncoderModel(_PerRequestModel):
    """``prompt`` BYTES [1 or 2] (prompt, negative prompt) -> ``text`` [N, 512, text_dim]."""

    name = "mvgen_text_encoder"

    def run(self, request, wanted):
        texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in _input(self.pb, request, "prompt").reshape(-1)]
        if len(texts) not in (1, 2):
            raise ValueError(f"'prompt' must hold 1 or 2 strings, got {len(texts)}")
        text, negative = self.pipe.encode_prompt(texts[0], texts[1] if len(texts) == 2 else None)
        return {"text": text if negative is None else torch.cat([text, negative])}


class ImageEncoderModel(_PerRequestModel):
    """``first_frame`` UINT8 [H, W, 3], optional ``first_frame_mask`` BOOL [H, W], ``size`` (height, width)
    -> ``image_context`` [1, 257, image_dim] of the conditioning frame."""

    name = "mvgen_image_encoder"

    def run(self, request, wanted):
        height, width = (int(v) for v in _input(self.pb, request, "size").reshape(-1))
        frame, _ = self.pipe.condition_frame(_input(self.pb, request, "first_frame"),
                                             _input(self.pb, request, "first_frame_mask"), height, width)
        return {"image_context": self.pipe.encode_image(frame)}


class VaeModel(_PerRequestModel):
    """Encode the I2V condition (``first_frame`` [+ mask] + ``size`` (frames, height, width) -> ``condition``),
    encode references (``references`` UINT8 [R, H, W, 3] -> ``ref_latents`` [1, R, 16, H/8, W/8]) or decode
    (``latents`` -> ``video`` UINT8 [F, H, W, 3]); the requested outputs choose."""

    name = "mvgen_vae"

    def run(self, request, wanted):
        pb, out = self.pb, {}
        if "condition" in wanted:
            frames, height, width = (int(v) for v in _input(pb, request, "size").reshape(-1))
            out["condition"] = self.pipe.prepare_condition(
                _input(pb, request, "first_frame"), _input(pb, request, "first_frame_mask"), frames, height, width)
        if "ref_latents" in wanted:
            images = _input(pb, request, "references")
            out["ref_latents"] = self.pipe.encode_references(list(images), *images.shape[1:3])
        if "video" in wanted:
            out["video"] = self.pipe.decode(_torch_input(pb, request, "latents"))
        return out


class DenoiserModel:
    """One denoiser call per dynamic batch: equal-shape requests run as one padded batch (``server.stages``)."""

    def __init__(self, model_config: dict, pb):
        self.pb = pb
        params = _parameters(model_config)
        self.pipe = stages.ServedModel.from_parameters(model_config.get("parameters", {})).load("mvgen_denoiser")
        self.pad_to = int(params.get("pad_batch_to", "0"))
        self.metrics = BatchMetrics(pb, "mvgen_denoiser")

    def execute(self, requests):
        groups: dict[tuple, list[int]] = {}
        parts = []
        for i, request in enumerate(requests):
            part = {name: _torch_input(self.pb, request, name) for name in stages.DENOISER_INPUTS}
            part["timestep"] = part["timestep"].reshape(-1)
            parts.append(part)
            groups.setdefault(tuple((k, tuple(v.shape[1:])) for k, v in part.items()), []).append(i)
        responses = [None] * len(requests)
        for indices in groups.values():
            rows = sum(parts[i]["latents"].shape[0] for i in indices)
            self.metrics.observe_batch(rows, len(indices))
            outputs = stages.denoise_batch(self.pipe.denoiser, [parts[i] for i in indices], self.pad_to)
            for i, velocity in zip(indices, outputs):
                responses[i] = self.pb.InferenceResponse(output_tensors=[_out(self.pb, "velocity", velocity)])
        return responses

    def finalize(self):
        self.pipe = None


class RemoteStages:
    """``server.stages.Stages`` over BLS calls to the encoder, VAE and denoiser models."""

    def __init__(self, pb, dtype: torch.dtype):
        self.pb = pb
        self.dtype = dtype

    def _call(self, model: str, inputs: dict, outputs: list[str]) -> list[torch.Tensor | np.ndarray]:
        pb = self.pb
        tensors = [_out(pb, name, value) for name, value in inputs.items() if value is not None]
        response = pb.InferenceRequest(model_name=model, inputs=tensors, requested_output_names=outputs).exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        return [torch.from_dlpack(pb.get_output_tensor_by_name(response, name).to_dlpack()).clone() for name in outputs]

    def text(self, prompt, negative_prompt):
        texts = [prompt] if negative_prompt is None else [prompt, negative_prompt]
        return self._call("mvgen_text_encoder", {"prompt": np.array([t.encode("utf-8") for t in texts], dtype=object)},
                          ["text"])[0]

    def image(self, first_frame, mask, height, width):
        return self._call("mvgen_image_encoder", {"first_frame": first_frame, "first_frame_mask": mask,
                                                  "size": np.array([height, width], np.int32)}, ["image_context"])[0]

    def condition(self, first_frame, mask, num_frames, height, width):
        return self._call("mvgen_vae", {"first_frame": first_frame, "first_frame_mask": mask,
                                        "size": np.array([num_frames, height, width], np.int32)}, ["condition"])[0]

    def references(self, images, height, width):
        return self._call("mvgen_vae", {"references": images}, ["ref_latents"])[0]

    def denoise(self, inputs):
        inputs = dict(inputs)
        if inputs["ref_latents"] is None:  # R = 0: an empty reference axis keeps the batch shape uniform
            b, _, _, h, w = inputs["latents"].shape
            inputs["ref_latents"] = inputs["latents"].new_zeros(b, 0, 16, h, w)
        inputs["timestep"] = inputs["timestep"].reshape(-1, 1).float()
        return self._call("mvgen_denoiser", inputs, ["velocity"])[0]

    def decode(self, latents):
        return self._call("mvgen_vae", {"latents": latents.float()}, ["video"])[0].numpy()


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
        self.pipe = stages.ServedModel.from_parameters(model_config.get("parameters", {})).load("mvgen")
        self.stages = RemoteStages(pb, self.pipe.dtype)
        self.metrics = LoopMetrics(pb, self.name)
        self.pool = ThreadPoolExecutor(max_workers=int(params.get("max_concurrency", "8")),
                                       thread_name_prefix=self.name)
        self.lock = threading.Lock()

    def execute(self, requests):
        for request in requests:
            future = self.pool.submit(self._serve, request, request.get_response_sender(), time.perf_counter())
            future.add_done_callback(self._log_crash)
        return None

    def _log_crash(self, future) -> None:
        error = future.exception()
        if error is not None:
            self.pb.Logger.log_error(f"{self.name}: worker crashed: {type(error).__name__}: {error}")

    def _serve(self, request, sender, arrived: float):
        pb = self.pb
        outcome = "error"
        try:
            self.metrics.request_started(time.perf_counter() - arrived)
            arguments = protocol.request_arguments(lambda name: _input(pb, request, name))
            generation = self.pipe.make_request(**arguments)

            def on_step(step, total, seconds):
                self.metrics.observe_step(seconds)
                if self.decoupled:
                    sender.send(pb.InferenceResponse(output_tensors=[_out(pb, "progress", np.array([step, total], np.int32))]))

            video = stages.generate(self.pipe, generation, self.stages, on_step, request.is_cancelled)
            outputs = [_out(pb, "video", video)]
            if self.decoupled:
                outputs.append(_out(pb, "progress", np.array([generation.steps, generation.steps], np.int32)))
            sender.send(pb.InferenceResponse(output_tensors=outputs), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            outcome = "success"
        except stages.Cancelled:
            outcome = "cancelled"
            self._fail(sender, "request cancelled", pb.TritonError.CANCELLED)
        except RequestError as error:
            outcome = "rejected"
            self._fail(sender, str(error), pb.TritonError.INVALID_ARG)
        except Exception as error:  # a bug or a failed sub-model: answer, log, keep serving
            pb.Logger.log_error(f"{self.name}: {type(error).__name__}: {error}")
            self._fail(sender, f"internal error: {type(error).__name__}: {error}", pb.TritonError.INTERNAL)
        finally:
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
