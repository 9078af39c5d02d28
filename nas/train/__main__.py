"""`python -m nas.train`: the command lives in nas/cli/train.py."""

import sys

from nas.cli.train import main

sys.exit(main())
