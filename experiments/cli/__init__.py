"""The ``vlm-lens`` command line (``vlm_lens.experiments.cli:app``).

- :mod:`~vlm_lens.experiments.cli.app`: the typer app, exit codes (0 ok, 1 a failed run, 2 bad input) and the
  registration of every command;
- :mod:`~vlm_lens.experiments.cli.common`: what the commands share (one-line failures, loading, input checks,
  progress, the stage summary), and :mod:`~vlm_lens.experiments.cli.outputs`: output-path checks;
- one module per group of commands: ``analyze`` (analyze, report), ``lens`` (tune-lens, validate), ``tools``
  (skip, hooks, demo), ``zoo`` (zoo train | plant | evaluate).

May import everything in :mod:`vlm_lens.experiments`; nothing imports it.
"""

from vlm_lens.experiments.cli.app import app, main

__all__ = ["app", "main"]
