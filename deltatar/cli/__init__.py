"""The ``deltatar`` command line: argument parsing and all terminal output.

The library never prints; this package turns its results into a line or a
table for people, or one JSON document on stdout for scripts.  ``parser``
holds the grammar, ``commands`` one handler a command, ``output`` what is
drawn, and ``app`` runs a command and turns errors into exit statuses.
"""

from .app import main

__all__ = ["main"]
