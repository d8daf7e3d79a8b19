"""Running a command: options in, one exit status out.

Errors the user can act on become one line on stderr and exit status 1; bad
usage exits 2; anything else is a bug and keeps its traceback.  Logging is
configured here, since the library only logs and never decides where to.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from ..errors import DeltatarError
from .commands import EXIT_BROKEN_PIPE, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE
from .output import print_err, print_json, stderr_console
from .parser import STORE_VARIABLE, build_parser


def main(argv: list[str] | None = None) -> int:
    # A name or message the terminal's encoding cannot show is escaped, never
    # fatal: reporting must not fail on what it reports.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    command_parser = args.command_parser
    if extra:
        command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _configure_logging(args)
    if args.needs_store and not args.store:
        command_parser.error(f"--store is required (or set {STORE_VARIABLE})")
    _apply_object_store_options(args)
    return _run(args)


def _run(args) -> int:
    """Run the command; turn the errors a user can act on into one line."""
    try:
        return args.handler(args)
    except DeltatarError as error:
        if args.debug:
            raise
        _report_error(args, error)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print_err("deltatar: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``deltatar ls | head``): nothing left to say.
        # Point stdout at /dev/null so the flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _report_error(args, error: DeltatarError) -> None:
    from ..errors import StoreNotFound

    message = str(error)
    if isinstance(error, StoreNotFound) and args.store:
        message += _store_hint(args.store)
    if args.json:
        print_json(
            {
                "error": {
                    "type": type(error).__name__,
                    "message": message,
                    "exit_code": EXIT_ERROR,
                }
            }
        )
    print_err(f"deltatar: error: {message}")


def _store_hint(location: str) -> str:
    """Name a store the user probably meant: inside the directory, or beside it."""
    import difflib
    from pathlib import Path

    from ..store import HEADER_NAME

    path = Path(location)
    with contextlib.suppress(OSError):
        inside = [c for c in path.iterdir() if (c / HEADER_NAME).is_file()]
        if len(inside) == 1:
            return f"; did you mean --store {inside[0]}?"
    with contextlib.suppress(OSError):
        siblings = {
            child.name: child
            for _, child in zip(range(1000), path.parent.iterdir(), strict=False)
            if (child / HEADER_NAME).is_file()
        }
        close = difflib.get_close_matches(path.name, list(siblings), n=1)
        if close:
            return f"; did you mean --store {siblings[close[0]]}?"
    return ""


def _apply_object_store_options(args) -> None:
    """Options override the AWS environment variables, as in the AWS tools.

    The object store backend reads its endpoint and region where every S3
    client looks for them, so the options are handed on the same way.
    """
    if args.endpoint_url:
        os.environ["AWS_ENDPOINT_URL_S3"] = args.endpoint_url
    if args.region:
        os.environ["AWS_REGION"] = args.region


def _configure_logging(args) -> None:
    """Logs go to stderr: through rich on a terminal, as plain lines otherwise."""
    level = _log_level(args)
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(
            console=stderr_console(), show_time=False, show_path=False, markup=False
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_PlainFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


class _PlainFormatter(logging.Formatter):
    """``deltatar: warning: message``, like the error line, for pipelines."""

    def format(self, record: logging.LogRecord) -> str:
        return f"deltatar: {record.levelname.lower()}: {record.getMessage()}"


def _log_level(args) -> int:
    if args.log_level is not None:
        return getattr(logging, args.log_level.upper())
    if args.debug or args.verbose >= 2:
        return logging.DEBUG
    if args.quiet:
        return logging.ERROR
    if args.verbose == 1:
        return logging.INFO
    return logging.WARNING
