"""``python -m sparse_transformer`` (also how torchrun starts the trainer)."""

import sys

from .cli import main

sys.exit(main())
