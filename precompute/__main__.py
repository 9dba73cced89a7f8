"""`python -m precompute` / `accelerate launch -m precompute` (and `python -m precompute prompts`)."""

import sys

from .cli import main

sys.exit(main())
