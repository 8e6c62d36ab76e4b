"""``python -m slimoptim``: the same as the ``slimoptim`` command."""

import sys

from .cli import main

sys.exit(main())
