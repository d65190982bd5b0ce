"""The suite runner: one command per results table (issue 13).

    nestlearn suite experiments/formal.yaml      # trains the grid, resumable (or python -m nestlearn.suite)
    from nestlearn.suite import run_suite, load_experiment

Modules, one job each: ``experiment`` (the file format and the grid), ``params`` (building every
spec, counting and matching parameters), ``runner`` (training and resuming through ``Trainer``),
``evaluate`` (length generalisation, continual forgetting), ``stats`` (mean +- std, forgetting %),
``report`` (rows, tables, results.md), ``table`` (md / json / rich / 80-column text), ``plots``.
"""

from nestlearn.suite.cli import run_suite
from nestlearn.suite.errors import SuiteError
from nestlearn.suite.experiment import Experiment, Run, load_experiment

__all__ = ["run_suite", "load_experiment", "Experiment", "Run", "SuiteError"]
