"""Custom kernels for mvgen. Each kernel has a PyTorch reference beside it (the CPU path and the oracle)."""
from .joint_attention import joint_attention_reference


def joint_attention(q, k, v, q_pos, k_pos, *, n_video_q, n_video_k, key_scale=None, mask="full",
                    tokens_per_frame=1, proto_tokens=1, theta=10000.0, sm_scale=None, backend="auto"):
    """Dispatch point of the joint attention (the Triton kernel is added by the kernels work)."""
    return joint_attention_reference(
        q, k, v, q_pos, k_pos, n_video_q=n_video_q, n_video_k=n_video_k, key_scale=key_scale, mask=mask,
        tokens_per_frame=tokens_per_frame, proto_tokens=proto_tokens, theta=theta, sm_scale=sm_scale,
    )
