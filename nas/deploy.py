"""`python -m nas.deploy`: the command lives in nas/cli/deploy.py."""

import sys

from nas.cli.deploy import main

if __name__ == "__main__":
    sys.exit(main())
