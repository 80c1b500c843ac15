"""``python -m ptool.cli`` runs the command line (same as the ``ptool`` script)."""

import sys

from ptool.cli import main

sys.exit(main())
