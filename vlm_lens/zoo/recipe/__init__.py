"""Build-time recipes of the embedded models: training from scratch (:mod:`.train`) and planting a prior
(:mod:`.plant`). Nothing on the run-time path (``import vlm_lens``, loading, probes, reports) imports this package."""
