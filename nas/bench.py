"""`python -m nas.bench`: the command lives in nas/cli/bench.py."""

import sys

from nas.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
