"""``python -m vlm_lens.experiments.cli``: the ``vlm-lens`` command."""

from vlm_lens.experiments.cli.app import app

app()
