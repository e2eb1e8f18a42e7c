"""`python -m flowers_dist`, which is what `accelerate launch -m` and `torchrun -m` run."""

import sys

from .cli import main

sys.exit(main())
