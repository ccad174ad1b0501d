"""What a running denoiser keeps and how it runs: per-request caches, the step cache, offload, sequence/CFG
parallel and its worker processes, batch invariance."""
