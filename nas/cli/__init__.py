"""The command-line entry points, one module each: parse, call library code, print. None imports
another; `python -m nas.X` and the `nas-X` console scripts run them."""
