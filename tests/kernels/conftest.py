"""Kernel tests run the Triton kernels through the interpreter on CPU tensors.

``TRITON_INTERPRET`` is read when a function is decorated with ``@triton.jit``, Triton's own library
(``tl.sum``, ...) included, so it must be set before Triton is first imported. It is set here, at import. When
another test directory got Triton imported first (diffusers imports it), the interpreted tests are skipped in
this process and ``test_fresh_process.py`` runs them in a fresh interpreter instead.
"""
import os
import zlib

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"


def interpreter_ready() -> bool:
    """True if Triton's ``@jit`` library functions were decorated in interpreter mode."""
    import triton
    import triton.language.standard as standard

    return not isinstance(standard.sum, triton.runtime.JITFunction)


INTERPRETER_READY = interpreter_ready()

needs_interpreter = pytest.mark.skipif(
    not INTERPRETER_READY,
    reason="Triton was imported before TRITON_INTERPRET could be set; test_fresh_process runs this file",
)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's id: fresh inputs per test, reproducible across runs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
