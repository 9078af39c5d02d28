"""`python -m nas.summary`: the command lives in nas/cli/summary.py."""

import sys

from nas.cli.summary import main

if __name__ == "__main__":
    sys.exit(main())
