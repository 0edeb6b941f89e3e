"""The command line is the one room for argv: the other modules expose plain functions and never import it back."""

import re
from pathlib import Path

import training

IMPORTS_CLI = re.compile(r"^\s*(from training\.cli import|from training import .*\bcli\b|import training\.cli)", re.M)


def test_no_module_imports_the_command_line_back():
    package = Path(training.__file__).parent
    importers = sorted(p.name for p in package.glob("*.py")
                       if p.name not in ("cli.py", "__main__.py") and IMPORTS_CLI.search(p.read_text()))
    assert importers == []
