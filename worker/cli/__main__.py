"""``python -m worker.cli``: the same command as ``leadstage``."""

from worker.cli import main

raise SystemExit(main())
