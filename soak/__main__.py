"""``python -m soak``: run the soak (options: ``python -m soak --help``)."""

import sys

from soak.run import main

sys.exit(main())
