"""HunyuanVideo (an MMDiT): the triple-stream denoiser (``model``), its loader and its text encoders and VAE."""
