"""`python -m precompute` / `accelerate launch -m precompute`."""

import sys

from .main import main

sys.exit(main())
