"""``python -m stalroute …`` runs the same command line as the ``stalroute`` script."""

import sys

from stalroute.cli import main

sys.exit(main())
