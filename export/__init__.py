"""Deployment of the denoiser: ONNX export, verification, TensorRT engines, a Triton model repository.

Heavy optional dependencies (onnxruntime-extensions, polygraphy, TensorRT) are imported where used.
"""
