"""``python -m nestlearn``: the command line."""

from nestlearn.cli import main

main()
