"""What the command-line tools share: argparse errors as the tool's one error line.

    p = OneLineParser(prog=PROG, ...)        # a bad flag raises ValueError (no usage text)
    ...
    except ValueError as e:
        print(error_line(PROG, e), file=sys.stderr); return 2

A user's mistake ends a tool with one line `PROG: error: ...` as its last output (argparse would
print its whole usage text first).
"""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors raise ValueError, for the tool's main to print as one line."""

    def error(self, message: str) -> None:   # type: ignore[override]
        raise ValueError(message)


def error_line(prog: str, error: BaseException) -> str:
    """`PROG: error: MESSAGE` on one line (the message's line breaks and runs of spaces
    collapsed)."""
    return f"{prog}: error: {' '.join(str(error).split())}"
