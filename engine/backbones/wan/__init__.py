"""Wan2.1-T2V/I2V and Wan2.2-I2V-A14B's experts: the multi-view denoiser (``model``) and single-file checkpoints."""
