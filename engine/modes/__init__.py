"""The seed methods' modes of the denoiser, one module each (the denoiser builds the ones its config asks for)."""
from .prototype import PrototypeAggregator, attention_flops  # noqa: F401  ProFashion PPA (ref_attention="prototype")
from .identity import IdentityCrossAttention  # noqa: F401  M2HVideo distribution-aware adapter (identity=True)
from .view_attention import ViewAttention, paper_view_omega  # noqa: F401  MVAnimate Eq. 2 (view_attention="multiview")
