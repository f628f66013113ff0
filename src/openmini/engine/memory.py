"""Returning freed heap memory to the operating system after model loading.

Loading dequantizes every GGUF tensor to float32 before re-packing it (int4/int8), so the
process briefly holds the whole float32 model (~540 MiB for SmolLM2-135M). glibc keeps most
of those freed blocks in its heap arenas (its mmap threshold grows after the first large
frees), so resident memory stays ~250 MiB above what the model needs unless the heap is
trimmed. ``malloc_trim(0)`` (glibc, ``man 3 malloc_trim``) releases the free pages.
"""

from __future__ import annotations

import ctypes
import sys


def trim_process_heap() -> bool:
    """Ask the C allocator to return free heap pages to the OS (glibc ``malloc_trim(0)``).

    Returns:
        True when memory was released; False when nothing was released or the platform's C
        library has no ``malloc_trim`` (macOS, musl, Windows): a no-op there, never an error.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim  # libc is already loaded: no library search
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))
