"""``python -m bench``: run the benchmark suite (options: ``--help``)."""

from .cli import main

raise SystemExit(main())
