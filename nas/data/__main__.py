"""`python -m nas.data`: the command lives in nas/cli/data.py."""

import sys

from nas.cli.data import main

sys.exit(main())
