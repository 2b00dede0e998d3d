"""``python -m mace_ase.cli`` = the ``mace-ase`` command."""

import sys

from mace_ase.cli import main

sys.exit(main())
