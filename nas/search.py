"""`python -m nas.search`: the command lives in nas/cli/search.py."""

import sys

from nas.cli.search import main

if __name__ == "__main__":
    sys.exit(main())
