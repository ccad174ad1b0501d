"""Kernel tests run the Triton kernels through the interpreter on CPU tensors.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here, before any test module imports a
kernel module (``kernels`` itself imports them lazily, so other test directories are not affected).
"""
import os
import zlib

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's id: fresh inputs per test, reproducible across runs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
