"""``python -m bench``: run every benchmark phase for both sides and print the table."""

from bench.run import main

raise SystemExit(main())
