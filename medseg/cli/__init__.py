"""The ``medseg`` command line: thin wrappers around one library function per verb.

Exit codes: 0 success; 1 the job ran but some cases failed (they are listed); 2 bad usage,
configuration or input, or an output that cannot be written because the disk is full (one
readable line naming the file or key); 3 an unexpected internal error (a bug: rerun with
``--debug``, which prints the traceback and exits with the same code, and report it).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

from medseg.cli.commands import COMMANDS, EXIT_INTERNAL, EXIT_USAGE
from medseg.cli.parser import build_parser

__all__ = ["build_parser", "main"]


def _setup_logging(quiet: bool, debug: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="medseg: %(message)s",
        stream=sys.stderr,
    )
    if not debug:
        # pydicom logs a traceback of its own before medseg reports a failed decode in one line.
        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
        # highdicom logs the source's SOP instance UIDs at INFO level
        logging.getLogger("highdicom").setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medseg`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet, args.debug)
    if not args.debug and args.verb != "data":
        from medseg.utils import import_tensorflow_quietly

        import_tensorflow_quietly()
    from medseg.errors import MedsegError

    try:
        return COMMANDS[args.verb](args)
    except MedsegError as e:
        if args.debug:
            traceback.print_exc()
        print(f"medseg: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("medseg: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        return _internal_error(e, args.debug)


def _internal_error(e: Exception, debug: bool) -> int:
    """Report an unexpected exception: a full disk is the user's (2), anything else a bug (3)."""
    from medseg.utils import is_disk_full

    if debug:
        traceback.print_exc()
    if is_disk_full(e):  # a full disk outside medseg's own writers (TensorFlow, Keras)
        where = getattr(e, "filename", None) or "output"
        print(f"medseg: error: {where}: no space left on the output disk", file=sys.stderr)
        return EXIT_USAGE
    hint = "" if debug else " (rerun with --debug for the traceback)"
    print(f"medseg: internal error: {type(e).__name__}: {e}{hint}", file=sys.stderr)
    return EXIT_INTERNAL
