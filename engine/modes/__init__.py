"""The seed methods' modes of the denoiser, one module each (the denoiser builds the ones its config asks for)."""
from .identity import IdentityCrossAttention  # noqa: F401  M2HVideo distribution-aware adapter (identity=True)
