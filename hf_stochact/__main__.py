"""``python -m hf_stochact``: the ``hf-stochact`` command line, as ``python -m hf_stochact.cli``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
