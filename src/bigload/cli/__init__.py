"""The ``bigload`` command: ``main.py`` holds the root parser, each subcommand its own module
(``inspect``, ``plan``, ``verify``, ``run``). Only the CLI prints; the library logs."""
