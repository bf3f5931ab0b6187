"""`python -m deeprecipe.cli` (and `torchrun -m deeprecipe.cli`): the `deeprecipe` command."""

import sys

from deeprecipe.cli import main

sys.exit(main())
