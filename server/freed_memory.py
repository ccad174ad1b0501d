"""Give the heap memory a served model has freed back to the system, at the end of a request.

The served processes allocate from a heap that is never trimmed on free (``server.launcher.HEAP_ENVIRONMENT``):
a call's activations reuse the pages the previous call faulted in, which made the VAE ~40% faster than with
glibc's defaults. Fixing a small threshold instead (``MALLOC_MMAP_THRESHOLD_`` 256 KiB, every large block mapped
and unmapped) made a denoiser step 1.4-1.6x as long. So memory is returned explicitly once a request is done:
``malloc_trim`` at the denoiser's release call and after the VAE's decode (a request's last call of each); the
next request's first call faults its pages in again (tens of milliseconds). The encoders' activations are small.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    library = ctypes.CDLL(name) if name else None
    return library if library is not None and hasattr(library, "malloc_trim") else None


def return_freed_memory() -> bool:
    """``malloc_trim(0)`` where the C library has it (glibc); False elsewhere (nothing to do or no way to)."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
