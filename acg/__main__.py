"""`python -m acg` is the `acg` command."""

import sys

from acg.cli import main

sys.exit(main())
