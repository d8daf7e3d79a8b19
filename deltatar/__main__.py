"""Let ``python -m deltatar`` behave exactly like the ``deltatar`` command."""

from .cli import main

raise SystemExit(main())
