"""``python -m bigload`` (and ``torchrun -m bigload``): the command line."""

import sys

from bigload.cli.main import main

sys.exit(main())
