"""``python -m nestlearn.suite experiments/formal.yaml``: the same as ``nestlearn suite``."""

from nestlearn.cli.suite_cmds import main

main()
