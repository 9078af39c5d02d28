"""`python -m nas.confirm`: the command lives in nas/cli/confirm.py."""

import sys

from nas.cli.confirm import main

if __name__ == "__main__":
    sys.exit(main())
