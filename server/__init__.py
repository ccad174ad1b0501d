"""Serving on Triton Inference Server: the model repository generator, its thin adapters, launcher and client."""
