"""Experiments: probes composed into the paper's analyses, dataset runs, the report and the command line.

Four rooms, imported one way (each may import the ones before it, never after):

- :mod:`~vlm_lens.experiments.analysis`: per-sample evidence and the aggregation (critical / mutation layers,
  stages, hallucination, layer skipping, feature clusters, validation);
- :mod:`~vlm_lens.experiments.runs`: sources, streaming into a resumable store, Ray, reading stores back;
- :mod:`~vlm_lens.experiments.report`: the report from a store;
- :mod:`~vlm_lens.experiments.pipeline`: the main job (runs + report);
- :mod:`~vlm_lens.experiments.cli`: the ``vlm-lens`` command.

The flat module paths of earlier releases (``vlm_lens.experiments.knowledge_evolution``, ...) still import, with a
``DeprecationWarning`` (:data:`MOVED`, :mod:`vlm_lens.moved`).
"""

from vlm_lens import moved

# the flat module paths of 0.1 -> where they live now (importable, deprecated, for one release)
MOVED: dict[str, tuple[str, ...]] = {
    **{m: (f"analysis.{m}",) for m in ("evidence", "confirmation", "knowledge_evolution", "hallucination",
                                       "layer_skip", "feature_clusters", "tuned_lens", "validation",
                                       "suite_validation", "compare")},  # fmt: skip
    **{m: (f"runs.{m}",) for m in ("datasets", "manifest", "reduce", "store", "streaming", "distributed", "identity")},
    "store_report": ("runs.store_analysis", "report.build"),
    "charts": ("report.charts",),
    "sections": ("report.sections",),
    "png_export": ("report.png_export",),
    "cli_analyze": ("cli.analyze",),
    "cli_lens": ("cli.lens",),
    "cli_zoo": ("cli.zoo",),
    "outputs": ("cli.outputs",),
}
moved.install(__name__, MOVED)
