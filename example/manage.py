#!/usr/bin/env python
"""Django's command-line utility for the channels_mini demo project."""
import os
import sys
from pathlib import Path

EXAMPLE_DIR = Path(__file__).resolve().parent
REPO_ROOT = EXAMPLE_DIR.parent

# `demo` and `chat` live next to this file, and channels_mini.py one folder
# up. Putting the repository root first means the demo always runs the copy
# of channels_mini it ships with, installed (pip install -e '.[demo]') or not.
for folder in (REPO_ROOT, EXAMPLE_DIR):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
