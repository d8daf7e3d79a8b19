"""Give memory freed in bulk back to the operating system.

An append frees the walk of the tree and the previous visit's entries (a
few hundred thousand small objects) just before it needs two whole
manifests at once.  The C allocator keeps most freed pages for later small
allocations, but the manifests are large buffers that come from fresh pages,
so without help the freed pages would count in the peak a second time.
"""

from __future__ import annotations

import functools


@functools.cache
def _trim():
    """glibc's ``malloc_trim``, or None where the C library lacks it.

    Looked up on first use: ctypes costs a few milliseconds to import,
    which a command that never frees much should not pay.  The symbols the
    interpreter already has loaded include the C library's.
    """
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Return the allocator's free pages to the system (where it can)."""
    trim = _trim()
    if trim is not None:
        trim(0)
