"""`python -m nas.report`: the command lives in nas/cli/report.py."""

import sys

from nas.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
