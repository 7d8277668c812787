"""`python -m blip2.cli ...` (as torchrun starts it: `torchrun ... -m blip2.cli train CFG`)."""

import sys

from blip2.cli import main

sys.exit(main())
