"""The batch-invariant linear (``--deterministic``): ``x @ weight.T + bias`` whose rows' bits do not depend on
the rows batched with them."""
from .reference import ROW_BLOCK, batch_invariant_linear_reference

__all__ = ["ROW_BLOCK", "batch_invariant_linear_reference"]
