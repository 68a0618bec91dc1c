"""``python -m distill.cli ...``: the same as the ``distill`` console script."""

import sys

from distill.cli import main

sys.exit(main())
