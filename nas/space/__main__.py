"""`python -m nas.space`: the command lives in nas/cli/space.py."""

import sys

from nas.cli.space import main

sys.exit(main())
