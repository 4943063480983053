"""``python -m vlseg.cli``: the same as the ``vlseg`` command."""

import sys

from vlseg.cli import main

sys.exit(main())
