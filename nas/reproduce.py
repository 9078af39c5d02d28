"""`python -m nas.reproduce`: the command lives in nas/cli/reproduce.py."""

import sys

from nas.cli.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
