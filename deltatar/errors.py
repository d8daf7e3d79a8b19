"""The exceptions deltatar raises on purpose.

Every error a user can cause or fix derives from :class:`DeltatarError`; its
message names the store, visit, path or option at fault and, where there is
one, the next thing to try.  The command line turns these into one line on
stderr and exit status 1; any other exception is a bug and keeps its
traceback.

    DeltatarError
    ├── UsageError          an argument or option is not acceptable
    ├── SourceError         the tree to append cannot be read as asked
    ├── StoreNotFound       no store at the given location
    ├── StoreLocked         another process holds the store's write lock
    ├── StoreNotWritable    this user may not write to the store
    ├── StoreChanged        the head moved while an operation ran
    ├── UnsupportedFormat   the store was written by a newer format version
    ├── VisitNotFound       no such visit, or it was compacted away
    ├── CorruptStore        an object is missing, damaged or hostile
    ├── NoSpace             the store's filesystem is full
    └── StoreUnavailable    the object store did not answer or refused access
"""

from __future__ import annotations


class DeltatarError(Exception):
    """Base of every error deltatar raises for the user to act on."""


class UsageError(DeltatarError):
    """An argument, option or destination is not acceptable."""


class SourceError(DeltatarError):
    """The source tree cannot be read the way the command asked."""


class StoreNotFound(DeltatarError):
    """The location given as a store holds no deltatar store."""


class StoreLocked(DeltatarError):
    """Another process holds the store's write lock for longer than we wait."""


class StoreNotWritable(DeltatarError):
    """The store exists but this process may not write to it."""


class StoreChanged(DeltatarError):
    """Another writer committed while this operation was running."""


class UnsupportedFormat(DeltatarError):
    """The store or one of its objects uses a format version we cannot read."""


class VisitNotFound(DeltatarError):
    """The visit asked for does not exist or was dropped by compaction."""


class CorruptStore(DeltatarError):
    """An object of the store is missing, damaged, or describes unsafe paths."""


class NoSpace(DeltatarError):
    """The filesystem holding the store ran out of space."""


class StoreUnavailable(DeltatarError):
    """The object store holding the store could not be reached or refused us.

    Not a :class:`CorruptStore`: nothing is known to be wrong with the store,
    and the same command run again when the server answers may succeed.
    """
