"""``fiber-plugins``: sample, info, demo, train, convert.

User mistakes (a :class:`~fiber_plugins.errors.UserError`: bad names, values, paths, shapes) print
one line ``fiber-plugins: error: ...`` and exit 2; any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import os
import shlex
import sys

from ..errors import (
    RunInterrupted,
    UserError,
)
from .parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        print(f"fiber-plugins: error: {lines[0]}", file=sys.stderr)
        return 2
    except RunInterrupted as err:
        print(f"fiber-plugins: {err}", file=sys.stderr)
        argv = list(sys.argv[1:] if argv is None else argv)
        again = [a for a in argv if a not in ("--overwrite", "--resume")] + ["--resume"]
        print(f"continue with: fiber-plugins {shlex.join(again)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("fiber-plugins: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`fiber-plugins plan expand PLAN | head`)
        # point stdout at /dev/null so that Python's flush at exit does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command a pipe closed on


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
