"""The format tag and version every stored JSON document carries.

The store header, the head and each manifest name their format and version;
a reader refuses a version newer than it knows, naming both, so that an old
deltatar never misreads a store written by a newer one.
"""

from __future__ import annotations

from typing import Any

from .errors import CorruptStore, UnsupportedFormat


def check_document(document: Any, kind: str, newest: int, source: str) -> dict:
    """Return ``document`` if it is a ``kind`` document of a version we read."""
    if not isinstance(document, dict) or document.get("format") != kind:
        raise CorruptStore(f"{source}: not a {kind} document")
    version = document.get("version")
    if not isinstance(version, int) or version > newest:
        raise UnsupportedFormat(
            f"{source}: {kind} format version {version} is newer than the "
            f"version {newest} this deltatar reads; upgrade deltatar"
        )
    return document
