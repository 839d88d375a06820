#!/usr/bin/env python
"""Django's command-line utility for the channels_mini demo project."""
import os
import sys
from pathlib import Path

EXAMPLE_DIR = Path(__file__).resolve().parent
REPO_ROOT = EXAMPLE_DIR.parent

# `demo` and `chat` live next to this file. channels_mini comes from the
# installed package (pip install -e '.[demo]') or, in a plain clone, from the
# repository root: appended, so an installed copy wins.
sys.path.insert(0, str(EXAMPLE_DIR))
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
