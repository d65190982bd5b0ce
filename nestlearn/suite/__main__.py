"""``python -m nestlearn.suite experiments/formal.yaml``."""

import sys

from nestlearn.suite.cli import main

sys.exit(main())
