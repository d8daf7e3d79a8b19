"""Give memory freed in bulk back to the operating system.

An append frees the walk of the tree and the previous visit's entries (a
few hundred thousand small objects) just before it needs two whole
manifests at once.  The C allocator keeps most freed pages for later small
allocations, but the manifests are large buffers that come from fresh pages,
so without help the freed pages would count in the peak a second time.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def _load_trim():
    """glibc's ``malloc_trim``, or None where the C library lacks it."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _load_trim()


def release_free_memory() -> None:
    """Return the allocator's free pages to the system (where it can)."""
    if _TRIM is not None:
        _TRIM(0)
