"""``python -m areplica``: the same as the ``areplica`` command."""

from .cli import main

raise SystemExit(main())
