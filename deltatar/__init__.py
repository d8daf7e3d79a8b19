"""deltatar: store each visit of a directory as only what changed.

Visit 1 of a directory becomes a full base; each later visit becomes a delta
layer holding the files added or changed since the visit before, plus
tombstones for what was deleted.  Any visit can be materialized exactly, and
compaction keeps restore cost and storage bounded.  See :class:`Store`.
"""

from typing import TYPE_CHECKING, Any

from .errors import DeltatarError

if TYPE_CHECKING:
    from .store import Store

__all__ = ["DeltatarError", "Store", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Store pulls in zstd, xxhash and orjson; importing it on first use keeps
    # `deltatar --version` and `--help` quick.
    if name == "Store":
        from .store import Store

        return Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
