"""Custom kernels for mvgen. Each kernel has a PyTorch reference beside it (the CPU path and the oracle)."""
