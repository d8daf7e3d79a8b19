"""deltatar: store each visit of a directory as only what changed.

Visit 1 of a directory becomes a full base; each later visit becomes a delta
layer holding the files added or changed since the visit before, plus
tombstones for what was deleted.  Any visit can be materialized exactly, and
compaction keeps restore cost and storage bounded.  See :class:`Store`.
"""

from .errors import DeltatarError
from .store import Store

__all__ = ["DeltatarError", "Store", "__version__"]
__version__ = "0.1.0"
