"""``python -m bigload`` (and ``torchrun -m bigload``): the command line."""

import sys

from bigload.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
