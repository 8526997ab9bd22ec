"""The command line's parsers: a usage error is one line, like every other bad input."""

from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors print one line (``PROG: error: MESSAGE (PROG --help
    for usage)``) and exit with status 2, instead of the usage block and then the message."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (`{self.prog} --help` for usage)", file=sys.stderr)
        sys.exit(2)
