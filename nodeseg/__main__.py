"""`python -m nodeseg <stage>` (what torchrun and PyTorchJob pods run)."""

import sys

from nodeseg.cli import main

sys.exit(main())
