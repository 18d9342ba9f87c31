"""The ``medseg`` command line: thin wrappers around one library function per verb.

Exit codes: 0 success; 1 the job ran but some cases failed (they are listed); 2 bad usage,
configuration or input, an output that cannot be written because the disk is full, or a run
folder or ``--out`` that another medseg process is using (one readable line naming the file or
key); 3 an unexpected internal error (a bug: rerun with ``--debug``, which prints the traceback
and exits with the same code, and report it); 130 interrupted by Ctrl-C (SIGINT) and 143 by
SIGTERM (128 + the signal number, as a shell reports a process the signal ended).

``SIGTERM`` (what Slurm, Kubernetes and ``kill`` send) is treated like Ctrl-C: it becomes a
``KeyboardInterrupt`` in the main thread, so the epoch or case under way is discarded (what was
committed stays: finished epochs, finished cases) and the same command resumes. A second
``SIGTERM`` during that clean-up is ignored, so that the clean-up finishes.

The global options ``--debug`` and ``--quiet`` go before or after the verb.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Iterator

from medseg.cli.commands import COMMANDS, EXIT_INTERNAL, EXIT_USAGE, claim_folders
from medseg.cli.parser import build_parser
from medseg.errors import MedsegError

__all__ = ["EXIT_SIGINT", "EXIT_SIGTERM", "build_parser", "main"]

#: Exit codes of an interrupted command: 128 + the signal number.
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM


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


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[list[int]]:
    """Within the block, ``SIGTERM`` raises ``KeyboardInterrupt`` in the main thread (once; a
    second one is ignored while the first is being handled). Yields a list that receives the
    signal number. Outside the main thread (where handlers cannot be set) nothing changes."""
    received: list[int] = []

    def handler(signum, frame):
        if received:
            return
        received.append(signum)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield received
        return
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medseg`` console script; returns the exit code."""
    with sigterm_as_interrupt() as received:
        args = build_parser().parse_args(argv)
        _setup_logging(args.quiet, args.debug)
        try:
            # the run folder or --out is locked before TensorFlow starts: a second process
            # given the same folder is refused at once
            with claim_folders(args):
                if not args.debug and args.verb != "data":
                    from medseg.utils import import_tensorflow_quietly

                    import_tensorflow_quietly()
                return COMMANDS[args.verb](args)
        except MedsegError as e:
            if args.debug:
                traceback.print_exc()
            print(f"medseg: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            by = "SIGTERM" if received else "Ctrl-C"
            print(
                f"medseg: interrupted ({by}); what had finished is kept: run the same command "
                "again to continue",
                file=sys.stderr,
            )
            return EXIT_SIGTERM if received else EXIT_SIGINT
        except Exception as e:
            return _internal_error(e, args.debug)


def _internal_error(e: Exception, debug: bool) -> int:
    """Report an unexpected exception: an output that cannot be written (a full disk, a
    read-only file system, a missing permission: :func:`medseg.utils.output_error`, raised
    outside medseg's own writers, e.g. by TensorFlow or Keras) is the user's (2), anything else
    a bug (3)."""
    from medseg.utils import display_text, output_error

    if debug:
        traceback.print_exc()
    mapped = output_error(display_text(str(getattr(e, "filename", None) or "output")), e)
    if mapped is not None:
        print(f"medseg: error: {mapped}", file=sys.stderr)
        return EXIT_USAGE
    hint = "" if debug else " (rerun with --debug for the traceback)"
    print(f"medseg: internal error: {type(e).__name__}: {e}{hint}", file=sys.stderr)
    return EXIT_INTERNAL
