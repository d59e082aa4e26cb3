"""Entry point: `python -m fieldlens.bench`."""

import sys

from fieldlens.bench import main

sys.exit(main())
