"""The ``plugin`` attention: one custom ONNX node per joint self-attention of the denoiser.

Node (opset domain ``mvgen``, version 1)::

    out = mvgen.JointAttention(q, k, v, pos, key_scale, n_video, inv_freq, mask=..., theta=..., sm_scale=...)

Inputs (B batch, N tokens of the [video | reference] streams, H heads, D head_dim):
  - ``q``, ``k``, ``v``  [B, N, H, D] model dtype  projected and QK-normalised, *not* rotated (RoPE is in the op)
  - ``pos``        [N, 3] int64    integer (t, h, w) position of every token (Wan's 3-axis RoPE, RD-RoPE refs)
  - ``key_scale``  [N] float32     logit multiplier of each key: 1 for video keys, MVAnimate's omega_m for
                                   the keys of view m
  - ``n_video``    [1] int64       number of video tokens (the first ``n_video`` of the sequence); computed
                                   in-graph from shapes, read by the kernel from device memory
  - ``inv_freq``   [D/2] float32   per-pair RoPE inverse frequency, ``kernels.rope.rope_inv_freq(D, theta)``
                                   (a graph constant: the kernel reads it instead of owning a table)
Output: ``out`` [B, N, H, D], the dtype of ``q``.
Attributes:
  - ``mask`` (string): ``"full"`` (every token sees every token, MVI2V) or ``"isolated"`` (reference queries
    see only reference keys); ``"prototype"`` (PPA) is not exported by this build
  - ``theta`` (float): the RoPE base ``inv_freq`` was made from (10000 for Wan); bands t: D - 4*(D//6),
    h: 2*(D//6), w: 2*(D//6), pairs interleaved (x[2j], x[2j+1]) as in ``kernels/rope.py``
  - ``sm_scale`` (float): softmax scale; 0 means 1/sqrt(D)
  - ``plugin_namespace`` (string): ``"mvgen"``; TensorRT's ONNX parser looks plugins up by op type plus
    this attribute, i.e. ``mvgen::JointAttention``
Semantics: ``kernels.joint_attention_reference(q, k, v, pos, pos, n_video_q=n_video, n_video_k=n_video,
key_scale=key_scale, mask=mask, theta=theta, sm_scale=sm_scale or None)``.

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

from kernels import joint_attention_reference
from kernels.rope import rope_inv_freq

DOMAIN = "mvgen"
OP_TYPE = "JointAttention"
OP_VERSION = 1
EXPORTED_MASKS = ("full", "isolated")
_ORT_CONTRIB_DOMAIN = "ai.onnx.contrib"


def _reference(q, k, v, pos, key_scale, n_video, inv_freq, mask: str, theta: float, sm_scale: float):
    n = int(n_video.reshape(-1)[0])
    if not torch.allclose(inv_freq.double(), rope_inv_freq(q.shape[-1], theta), rtol=1e-6):
        raise ValueError(f"JointAttention inv_freq input does not match theta={theta} for head_dim {q.shape[-1]}")
    return joint_attention_reference(q, k, v, pos, pos, n_video_q=n, n_video_k=n, key_scale=key_scale, mask=mask,
                                     theta=theta, sm_scale=sm_scale or None)


def joint_attention_node(q, k, v, pos, key_scale, n_video, inv_freq, mask: str, theta: float,
                         sm_scale: float = 0.0):
    """The plugin node: emitted as ``mvgen.JointAttention`` while exporting, the reference when run eagerly."""
    inputs = (q, k, v, pos, key_scale, n_video, inv_freq)
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::{OP_TYPE}", inputs,
            dict(mask=mask, theta=float(theta), sm_scale=float(sm_scale), plugin_namespace=DOMAIN),
            dtype=q.dtype, shape=q.shape, version=OP_VERSION,
        )
    return _reference(*inputs, mask, theta, sm_scale)


@contextlib.contextmanager
def plugin_attention(denoiser):
    """Route ``denoiser``'s joint attentions through ``joint_attention_node`` for the duration."""
    cfg = denoiser.config
    if cfg.ref_attention not in EXPORTED_MASKS:
        raise ValueError(f"plugin attention exports ref_attention in {EXPORTED_MASKS}, got {cfg.ref_attention!r}")

    def attend(self, q, k, v, q_pos, k_pos, n_video_q, n_video_k, key_scale):
        if q_pos is not k_pos or n_video_q != n_video_k:
            raise ValueError("the plugin node is the joint *self*-attention (same tokens for queries and keys)")
        if key_scale is None:
            key_scale = torch.ones(k.shape[1], device=k.device)
        n_video = torch.full((1,), n_video_k, dtype=torch.int64, device=q.device)
        inv_freq = rope_inv_freq(q.shape[-1], cfg.rope_theta).to(device=q.device, dtype=torch.float32)
        return joint_attention_node(q, k, v, q_pos, key_scale.float(), n_video, inv_freq, cfg.ref_attention,
                                    cfg.rope_theta)

    denoiser._attend = types.MethodType(attend, denoiser)
    try:
        yield denoiser
    finally:
        del denoiser._attend


# ---- onnxruntime -----------------------------------------------------------------------------------------
_ORT_OP = None


def register_onnxruntime_op() -> None:
    """Register the PyOp once per process (float32 q/k/v: verification runs the graph in fp32)."""
    global _ORT_OP
    if _ORT_OP is not None:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    @onnx_op(op_type=OP_TYPE,
             inputs=[PyCustomOpDef.dt_float] * 3 + [PyCustomOpDef.dt_int64, PyCustomOpDef.dt_float,
                                                     PyCustomOpDef.dt_int64, PyCustomOpDef.dt_float],
             outputs=[PyCustomOpDef.dt_float],
             attrs={"mask": PyCustomOpDef.dt_string, "theta": PyCustomOpDef.dt_float,
                    "sm_scale": PyCustomOpDef.dt_float, "plugin_namespace": PyCustomOpDef.dt_string})
    def joint_attention(q, k, v, pos, key_scale, n_video, inv_freq, mask="full", theta=10000.0, sm_scale=0.0,
                        plugin_namespace=DOMAIN):
        args = [torch.from_numpy(a) for a in (q, k, v, pos, key_scale, n_video, inv_freq)]
        return _reference(*args, mask, theta, sm_scale).numpy()

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
