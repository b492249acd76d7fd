"""Dataset runs: samples streamed through the model into a resumable store, and read back.

- :mod:`~.datasets` / :mod:`~.manifest`: sources (a list, a manifest, a folder of images, a saved HF dataset);
- :mod:`~.streaming`: trace -> analyse (:func:`vlm_lens.experiments.analysis.knowledge_evolution.analyze_sample`)
  -> reduce -> write, one batch at a time; :mod:`~.distributed`: the same on Ray actors;
- :mod:`~.reduce`: a sample -> store rows, and rows -> :class:`~.reduce.StoredSample`;
- :mod:`~.store`: the Parquet store (atomic shards, verified commits); :mod:`~.identity`: model/settings fingerprints;
- :mod:`~.store_analysis`: the aggregates computed from a store (no model needed).

May import :mod:`vlm_lens`, :mod:`vlm_lens.probes` and :mod:`vlm_lens.experiments.analysis`; never ``report`` or
``cli``.
"""
