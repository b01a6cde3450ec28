"""``python -m ghostcloak_relay``: the same as the ``ghostcloak-relay`` console script."""

from .cli import main

raise SystemExit(main())
