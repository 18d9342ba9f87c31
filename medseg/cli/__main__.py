"""``python -m medseg.cli``: the ``medseg`` command."""

import sys

from medseg.cli import main

sys.exit(main())
