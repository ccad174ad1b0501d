"""The denoiser as a served part: batches of calls from several requests, their per-request caches (reference
K/V, context K/V, step cache, kept inputs), sequence/CFG-parallel ranks and offload."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..backbones.families import ALL_TEXT_OUTPUTS
from ..backbones.registry import load_denoiser
from ..checkpoint import Checkpoint
from ..denoiser_io import STEP_INPUTS, step_only, text_outputs
from ..errors import CollectiveError, ReferenceCacheMiss
from .batch_invariance import batch_invariant_ops
from .caches import ContextCache, ReferenceCache
from .offload import apply_offload
from .parallel import ParallelRuntime
from .reference_cache import ReferenceCacheStore, expand_rows
from .step_cache import StepCache


class Denoiser:
    """One expert's multi-view DiT (``transformer/`` + LoRAs + adapter) and the reference K/V caches of the
    requests it serves (on Wan2.2 each expert keeps its own: the two reference streams differ).

    ``cache_bytes`` bounds the caches held at once (least recently used dropped first; a request whose cache
    was dropped sends its references again, see ``engine.generation``).
    """

    def __init__(self, checkpoint: Checkpoint, expert: int = 0, cache_bytes: int = 8 << 30,
                 parallel: ParallelRuntime | None = None):
        self.checkpoint = checkpoint
        self.expert = expert
        self.model = load_expert(checkpoint, expert)
        # --offload: the weights stay in host memory and visit the device per call (None: loaded onto it)
        self.offload = apply_offload(self.model, checkpoint.offload, checkpoint.device)
        self.caches = ReferenceCacheStore(cache_bytes)  # reference K/V per request (isolated + zero streams)
        self.requests = ReferenceCacheStore(cache_bytes)  # RequestState per request (same byte bound)
        # one rank of a sequence/CFG-parallel world (engine.runtime.parallel, engine.runtime.workers); None: the whole call here
        self.parallel = parallel
        if parallel is not None:
            self.model.parallelize(parallel.sp)
        # the text encoders' entries this family's denoiser does not take (Wan: an MMDiT's mask and pooled text),
        # which a call may carry as None (the loop and the server send every DENOISER_INPUTS name)
        family_text = text_outputs(checkpoint.experts[expert].config)
        self.foreign_inputs = set(ALL_TEXT_OUTPUTS) - set(family_text)

    @property
    def caches_references(self) -> bool:
        return self.model.config.caches_reference

    @property
    def caches_requests(self) -> bool:
        return self.model.config.caches_requests

    def release(self, cache_key: str) -> None:
        """Drop a request's caches (it finished, failed or was cancelled)."""
        self.caches.drop(cache_key)
        self.requests.drop(cache_key)

    def weight_bytes(self) -> int:
        """Bytes of the denoiser's weights, each storage once (a shared reference stream's are the video's)."""
        from ..adapters.reference_weights import weight_bytes

        return weight_bytes(self.model)

    def __call__(self, inputs: dict[str, torch.Tensor | None], cache_key: str | None = None,
                 cache_references: bool = True) -> torch.Tensor:
        """One call's velocity (see ``run``); its error is raised."""
        result = self.run([DenoiseCall(inputs, cache_key, cache_references)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    @torch.no_grad()
    def run(self, calls: list["DenoiseCall"], pad_to: int = 0) -> list[torch.Tensor | Exception]:
        """Each call's velocity, or the exception that failed that call alone.

        Calls of equal shapes (and equal reference-cache layouts) run as one batch; when a batch fails, its
        calls run one by one, so a bad or failing request never takes its companions down. Rows never
        interact in the denoiser; ``pad_to`` > 0 still runs every batch at that many rows (padding repeats
        row 0), so a request's bits cannot depend on its companions whatever the GEMM library does. A
        step-cached request runs alone: its skip decision is its own.
        """
        results: list[torch.Tensor | Exception | None] = [None] * len(calls)
        groups: dict[tuple, list[_Item]] = {}
        alone = self.model.config.step_cache_threshold > 0
        for index, call in enumerate(calls):
            try:
                item = self._resolve(index, call)
            except Exception as error:  # this request's inputs or cache: its own answer, the batch goes on
                results[index] = error
                continue
            signature = tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in sorted(item.inputs.items()) if v is not None)
            key = (signature, item.reference.layout if item.reference else None, item.state is not None,
                   index if alone else None)
            groups.setdefault(key, []).append(item)
        for items in groups.values():
            self._run_group(items, results, pad_to)
        for call, result in zip(calls, results):
            if isinstance(result, Exception) and call.cache_key is not None:
                self.release(call.cache_key)  # a failed request holds no cache
        return results

    def _resolve(self, index: int, call: "DenoiseCall") -> "_Item":
        """The call's inputs and caches: its per-request state (step-invariant inputs, cross-attention K/V, step
        cache), built at its first step, which fills a later step's inputs (``inputs_once``: those carry the
        latents and the timestep only); and its reference K/V (looked up, or built from the request's references)."""
        inputs = {name: value for name, value in call.inputs.items() if name not in self.foreign_inputs}
        if call.cache_key is None:
            return _Item(index, {**inputs, "ref_latents": _references(inputs)}, None, None)
        state = self._request_state(call.cache_key, inputs)
        if state is not None and step_only(inputs):  # a later step: the rest is the request's own
            inputs = {**state.inputs, **{name: inputs[name] for name in STEP_INPUTS}}
        refs = _references(inputs)
        if not (call.cache_references and self.caches_references):
            return _Item(index, {**inputs, "ref_latents": refs}, None, state)
        cache = self.caches.get(call.cache_key)
        if cache is None:
            if refs is None:
                raise ReferenceCacheMiss(call.cache_key)
            cache = self._build_reference(refs, inputs)
            self.caches.put(call.cache_key, cache)
        if self.model.config.shares_reference_rows:  # the request's one row, for each of this call's rows
            cache = expand_rows(cache, inputs["latents"].shape[0])
        return _Item(index, {**inputs, "ref_latents": None}, cache, state)

    def _build_reference(self, refs: torch.Tensor, inputs: dict) -> ReferenceCache:
        """A request's reference K/V from its references (and, where the references read it, its prompt and image
        context): every row of the call, or its first row alone where the rows cannot differ (the guidance rows
        share the references and differ only in the prompt, which a Stand-In reference stream never reads)."""
        rows = slice(0, 1) if self.model.config.shares_reference_rows else slice(None)
        first = (lambda t: t[rows] if t is not None else None)  # noqa: E731
        text_extras = {name: first(inputs[name]) for name in text_outputs(self.model.config) if name != "text"}
        return self.model.precompute_reference(first(refs), first(inputs["text"]), first(inputs["image_context"]),
                                               latent_fhw=tuple(inputs["latents"].shape[2:]), **text_extras)

    def _request_state(self, key: str, inputs: dict) -> "RequestState | None":
        """The request's state, built (or rebuilt, at other rows) from a call that carries every input; a call
        that carries only the step's inputs needs it to exist (else a ``ReferenceCacheMiss``: the loop sends
        everything again, as for an evicted reference cache)."""
        cfg = self.model.config
        if not cfg.caches_requests:
            return None
        state = self.requests.get(key)
        if step_only(inputs):
            if state is None or not state.inputs:
                raise ReferenceCacheMiss(key, "step-invariant inputs")
            return state
        rows = inputs["latents"].shape[0]
        if state is None or state.rows != rows or cfg.inputs_once:
            context = state.context if state is not None and state.rows == rows else None
            if context is None and cfg.caches_context:  # the same states at every step of the request: K/V once
                context = self.model.precompute_context(inputs["text"], inputs["image_context"],
                                                        inputs.get("identity_context"))
            step = state.step if state is not None and state.rows == rows else None
            if step is None and cfg.step_cache_threshold > 0:
                step = StepCache(cfg.step_cache_threshold)
            kept = {name: value for name, value in inputs.items() if name not in STEP_INPUTS} if cfg.inputs_once else {}
            state = RequestState(rows, context, step, kept)
            self.requests.put(key, state)
        return state

    def _run_group(self, items: list["_Item"], results: list, pad_to: int) -> None:
        try:
            outputs = self._forward(items, pad_to)
        except CollectiveError:  # the process group's failure, not a request's: no one-by-one retry
            raise
        except Exception as error:
            if len(items) == 1:
                results[items[0].index] = error
                return
            for item in items:  # find which request fails; the others are answered
                self._run_group([item], results, pad_to)
            return
        for item, velocity in zip(items, outputs):
            results[item.index] = velocity

    def _forward(self, items: list["_Item"], pad_to: int) -> list[torch.Tensor]:
        inputs = [item.inputs for item in items]
        sizes = [part["latents"].shape[0] for part in inputs]
        rows = sum(sizes)
        # absent inputs (a T2V condition, image context without CLIP) stay None
        batch = {name: torch.cat([part[name] for part in inputs]) if value is not None else None
                 for name, value in inputs[0].items()}
        if pad_to > rows:
            batch = {name: torch.cat([t, t[:1].expand(pad_to - rows, *t.shape[1:])]) if t is not None else None
                     for name, t in batch.items()}
        caches = dict(
            ref_cache=ReferenceCache.cat([i.reference for i in items], pad_to) if items[0].reference else None,
            context_cache=(ContextCache.cat([i.state.context for i in items], pad_to)
                           if items[0].state is not None and items[0].state.context is not None else None),
            step_cache=items[0].state.step if items[0].state is not None else None)  # step-cached: one request
        if caches["step_cache"] is not None:
            caches["step_cache"].real_rows = rows
        with batch_invariant_ops(self.model.config.deterministic):
            if self.parallel is not None:
                velocity = self.parallel.forward(self.model, batch, **caches)
            else:
                velocity = self.model(**batch, **caches)
        return list(velocity[:rows].split(sizes))


@dataclass
class RequestState:
    """What a denoiser keeps of one request between its steps, besides its reference K/V: every block's
    cross-attention K/V of its text/image/identity states, its step cache, and (``inputs_once``) its
    step-invariant inputs as its first step sent them, by ``DENOISER_INPUTS`` name (``rows`` rows each)."""

    rows: int
    context: ContextCache | None
    step: StepCache | None
    inputs: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        kept = sum(t.numel() * t.element_size() for t in self.inputs.values() if t is not None)
        return kept + sum(part.nbytes for part in (self.context, self.step) if part is not None)


def _references(inputs: dict) -> torch.Tensor | None:
    """A call's reference latents, None when it has none (absent, or R = 0 as the wire sends none)."""
    refs = inputs.get("ref_latents")
    return refs if refs is not None and refs.shape[1] > 0 else None


@dataclass
class _Item:
    """A resolved call: its index in the batch of calls, inputs, reference cache and request state."""

    index: int
    inputs: dict
    reference: ReferenceCache | None
    state: RequestState | None


def load_expert(checkpoint: Checkpoint, expert: int = 0, lora_scale: float | None = None):
    """The ``MultiViewWanTransformer`` of one expert of ``checkpoint``, its LoRAs and adapter merged."""
    spec = checkpoint.experts[expert]
    return load_denoiser(checkpoint.path, spec.adapter, dtype=checkpoint.dtype, device=checkpoint.weights_device,
                         lora_scale=lora_scale, folder=spec.folder, weights_file=spec.weights_file, loras=spec.loras,
                         lora_reference=spec.lora_reference, **checkpoint.overrides)


@dataclass
class DenoiseCall:
    """One request's denoiser step: inputs by ``DENOISER_INPUTS`` name (``ref_latents`` None or with R = 0 when
    there are none) and the request's cache key, under which the denoiser keeps what the request reuses."""

    inputs: dict[str, torch.Tensor | None]
    cache_key: str | None = None
    cache_references: bool = True  # False: the reference stream is recomputed at every step (--no-reference-cache)
