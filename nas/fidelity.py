"""`python -m nas.fidelity`: the command lives in nas/cli/fidelity.py."""

import sys

from nas.cli.fidelity import main

if __name__ == "__main__":
    sys.exit(main())
