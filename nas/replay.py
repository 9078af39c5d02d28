"""`python -m nas.replay`: the command lives in nas/cli/replay.py."""

import sys

from nas.cli.replay import main

if __name__ == "__main__":
    sys.exit(main())
