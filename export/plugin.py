"""The ``plugin`` attention: one custom ONNX node per joint self-attention of the denoiser.

Node (opset domain ``mvgen``, version 2)::

    out = mvgen.JointAttention(q, k, v, n_video, mask=...)

Inputs (B batch, N tokens of the [video | reference] streams, H heads, D head_dim):
  - ``q``, ``k``, ``v``  [B, N, H, D] model dtype  the QK prologue's outputs (``kernels.qk_prologue``, ordinary
                                   ONNX ops before the node): q and k RMSNorm'd and rotated by RoPE, q scaled
                                   by ``sm_scale * log2(e)``, key j by its logit multiplier (1 for video keys,
                                   MVAnimate's omega_m for the keys of view m), so ``q . k`` is a base-2 logit
  - ``n_video``    [1] int64       number of video tokens (the first ``n_video`` of the sequence); computed
                                   in-graph from shapes, read by the kernel from device memory
Output: ``out`` [B, N, H, D], the dtype of ``q``.
Attributes:
  - ``mask`` (string): ``"full"`` (every token sees every token, MVI2V) or ``"isolated"`` (reference queries
    see only reference keys); ``"prototype"`` (PPA) is not exported by this build
  - ``plugin_namespace`` (string): ``"mvgen"``; TensorRT's ONNX parser looks plugins up by op type plus
    this attribute, i.e. ``mvgen::JointAttention``
Semantics: ``kernels.rotated_attention_reference(q, k, v, q_offsets=(n_video, N), k_offsets=(n_video, N),
mask=mask)`` (two streams: no context stream, no key lengths).
(Version 1 took unrotated q/k plus positions and rotated inside the kernel's loop, once per key tile per query
block; the rotation now happens once per layer, before the node.)

Runtimes:
  - TensorRT: ``export/tensorrt_build.py`` registers ``mvgen::JointAttention`` as a quickly-deployable plugin
    (``tensorrt.plugin``) whose AOT implementation is the Triton kernel of ``kernels/joint_attention``
    (through the thin launch-convention wrapper in ``export/trt_kernel.py``).
  - onnxruntime (verification): a Python custom op of onnxruntime-extensions (PyOp) backed by the reference.
    PyOps live in the ``ai.onnx.contrib`` domain, so ``onnxruntime_model`` rewrites the domain of a copy of
    the graph before the session is built; the file on disk keeps ``mvgen``.
"""
from __future__ import annotations

import contextlib
import types

import onnx
import torch

from kernels import EXPORTED_MASKS, rotated_attention_reference

DOMAIN = "mvgen"
OP_TYPE = "JointAttention"
OP_VERSION = 2
_ORT_CONTRIB_DOMAIN = "ai.onnx.contrib"


def _reference(q, k, v, n_video, mask: str):
    n, n_tokens = int(n_video.reshape(-1)[0]), q.shape[1]
    return rotated_attention_reference(q, k, v, q_offsets=(n, n_tokens), k_offsets=(n, n_tokens), mask=mask)


def joint_attention_node(q, k, v, n_video, mask: str):
    """The plugin node: emitted as ``mvgen.JointAttention`` while exporting, the reference when run eagerly."""
    inputs = (q, k, v, n_video)
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::{OP_TYPE}", inputs, dict(mask=mask, plugin_namespace=DOMAIN),
            dtype=q.dtype, shape=q.shape, version=OP_VERSION,
        )
    return _reference(*inputs, mask)


@contextlib.contextmanager
def plugin_attention(denoiser):
    """Route ``denoiser``'s attention on the prologue's outputs through ``joint_attention_node`` for the duration
    (the prologue stays in the graph as ordinary ops)."""
    cfg = denoiser.config
    if cfg.ref_attention not in EXPORTED_MASKS:
        raise ValueError(f"plugin attention exports ref_attention in {EXPORTED_MASKS}, got {cfg.ref_attention!r}")

    def attend(self, q, k, v, q_offsets, k_offsets, mask, tokens_per_frame, proto_tokens, key_lengths):
        if q.shape[1] != k.shape[1] or tuple(q_offsets) != tuple(k_offsets):
            raise ValueError("the plugin node is the joint *self*-attention (same tokens for queries and keys)")
        if key_lengths is not None or q_offsets[1] != q.shape[1]:
            raise ValueError("the plugin node takes [video | reference] streams (no text stream, no key lengths)")
        n_video = torch.full((1,), q_offsets[0], dtype=torch.int64, device=q.device)
        return joint_attention_node(q, k, v, n_video, mask)

    denoiser._rotated_attention = types.MethodType(attend, denoiser)
    try:
        yield denoiser
    finally:
        del denoiser._rotated_attention


# ---- onnxruntime -----------------------------------------------------------------------------------------
_ORT_OP = None


def register_onnxruntime_op() -> None:
    """Register the PyOp once per process (float32 q/k/v: verification runs the graph in fp32)."""
    global _ORT_OP
    if _ORT_OP is not None:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    @onnx_op(op_type=OP_TYPE,
             inputs=[PyCustomOpDef.dt_float] * 3 + [PyCustomOpDef.dt_int64],
             outputs=[PyCustomOpDef.dt_float],
             attrs={"mask": PyCustomOpDef.dt_string, "plugin_namespace": PyCustomOpDef.dt_string})
    def joint_attention(q, k, v, n_video, mask="full", plugin_namespace=DOMAIN):
        return _reference(*(torch.from_numpy(a) for a in (q, k, v, n_video)), mask).numpy()

    _ORT_OP = joint_attention


def onnxruntime_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose ``mvgen`` nodes are in the PyOp domain (no-op for a graph without them)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        if node.domain == DOMAIN:
            node.domain = _ORT_CONTRIB_DOMAIN
    kept = [o for o in model.opset_import if o.domain != DOMAIN]
    if len(kept) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(kept + [onnx.helper.make_opsetid(_ORT_CONTRIB_DOMAIN, 1)])
    return model


def onnxruntime_session(path, providers=("CPUExecutionProvider",)):
    """An onnxruntime session of the exported graph that can also run ``mvgen.JointAttention`` nodes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not count_nodes(onnx.load(str(path), load_external_data=False)):
        return ort.InferenceSession(str(path), options, providers=list(providers))
    from onnxruntime_extensions import get_library_path

    register_onnxruntime_op()
    options.register_custom_ops_library(get_library_path())
    model = onnxruntime_model(onnx.load(str(path)))  # external data is read from beside the file
    return ort.InferenceSession(model.SerializeToString(), options, providers=list(providers))


def count_nodes(model: onnx.ModelProto) -> int:
    return sum(node.domain == DOMAIN and node.op_type == OP_TYPE for node in model.graph.node)
