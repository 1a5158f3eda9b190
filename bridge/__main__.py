"""``python -m bridge`` is ``koprs-bridge``."""

import sys

from bridge.cli import main

sys.exit(main())
