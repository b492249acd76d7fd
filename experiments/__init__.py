"""Experiments: probes composed into the paper's analyses, dataset runs, the report and the command line.

Four rooms, imported one way (each may import the ones before it, never after):

- :mod:`~vlm_lens.experiments.analysis`: per-sample evidence and the aggregation (critical / mutation layers,
  stages, hallucination, layer skipping, feature clusters, validation);
- :mod:`~vlm_lens.experiments.runs`: sources, streaming into a resumable store, Ray, reading stores back;
- :mod:`~vlm_lens.experiments.report`: the report from a store;
- :mod:`~vlm_lens.experiments.pipeline`: the main job (runs + report);
- :mod:`~vlm_lens.experiments.cli`: the ``vlm-lens`` command.

The flat module paths of earlier releases (``vlm_lens.experiments.knowledge_evolution``, ...) still import, with a
``DeprecationWarning`` (:mod:`~vlm_lens.experiments.moved`).
"""

from vlm_lens.experiments import moved

moved.install()
