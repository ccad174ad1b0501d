"""Runs the interpreted kernel tests in a fresh process when this one imported Triton too early."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernels.conftest import INTERPRETER_READY

HERE = Path(__file__).parent
INTERPRETED = ["test_joint_attention.py", "test_qk_prologue.py", "test_prototype.py", "test_fusions.py",
               "test_denoiser_kernel.py", "test_batch_invariant.py", "test_quantized_attention.py"]


@pytest.mark.skipif(INTERPRETER_READY, reason="the interpreted kernel tests run in this process")
def test_interpreted_kernel_tests_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *(str(HERE / f) for f in INTERPRETED)],
                          cwd=HERE.parent.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
