"""``python -m hdopt`` is the ``hdopt`` command (also what ``torchrun -m hdopt`` runs)."""

import sys

from hdopt.cli import main

sys.exit(main())
