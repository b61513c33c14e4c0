"""`python -m qmedsam ...` (and `torchrun ... -m qmedsam train ...`): the same entry point as `qmedsam`."""

import sys

from qmedsam.cli import main

sys.exit(main())
