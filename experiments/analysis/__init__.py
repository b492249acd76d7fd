"""Analysis: what the evidence of one traced sample says, and how samples aggregate.

- :mod:`~.knowledge_evolution`: the per-sample analysis (:func:`~.knowledge_evolution.analyze_sample`, the one
  function both entry points run), :func:`~.knowledge_evolution.aggregate` (the one aggregation), the stages, and
  :func:`~.knowledge_evolution.run` (the in-memory entry point; the dataset path is :mod:`vlm_lens.experiments.runs`);
- :mod:`~.evidence` (mutation events, critical layers, bootstrap intervals) and :mod:`~.confirmation` (the causal
  test of a candidate event);
- :mod:`~.hallucination`, :mod:`~.layer_skip`, :mod:`~.feature_clusters`: the paper's other experiments;
- :mod:`~.tuned_lens` (training one), :mod:`~.validation` / :mod:`~.suite_validation` (scoring the detector on planted
  ground truth), :mod:`~.compare` (two models side by side).

May import :mod:`vlm_lens` and :mod:`vlm_lens.probes`; never ``runs``, ``report`` or ``cli``.
"""
