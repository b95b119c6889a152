"""``python -m medconddiff`` is the ``medconddiff`` command (also what ``torchrun -m medconddiff`` runs)."""

import sys

from .cli import main

sys.exit(main())
