"""`python -m edgerund.ctl`: the same as the `edgerunctl` entry point."""

import sys

from edgerund.ctl.cli import main

sys.exit(main())
