"""``python -m signaling`` runs the CLI."""

import sys

from signaling.cli import main

sys.exit(main())
