"""Errors that mean "the run cannot go on, and here is why" — not bugs.

The CLI prints them (and ConfigError, DataError, OSError on a named path) in one line and exits
2; `--debug` shows the traceback. Any other exception keeps its traceback.
"""


class RunError(RuntimeError):
    """An expected failure of a run: the devices differ from the job's, training diverged,
    a checkpoint does not fit the run, a tokenizing worker died."""
