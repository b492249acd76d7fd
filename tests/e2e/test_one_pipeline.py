"""One analysis pipeline: the in-memory API (``knowledge_evolution.run``) and the dataset path (``pipeline.analyze``:
stream -> store -> report) run the same per-sample function and the same aggregation, so they write the same
numbers: report.json's config, aggregate and per-sample evidence equal ``to_json(run(...))``."""

import json

import vlm_lens
from vlm_lens.experiments import pipeline
from vlm_lens.experiments.analysis import knowledge_evolution as ke


def test_the_in_memory_api_and_the_dataset_path_write_the_same_report_json(tmp_path):
    model = vlm_lens.load(pipeline.DEFAULT_ANALYSIS_MODEL)  # the planted prior: mutation events
    bundled = pipeline.default_samples(model)
    samples = bundled[:2] + bundled[-2:]  # two clean questions, two counter-prior ones (events to compare)
    config = ke.EvolutionConfig(max_new_tokens=4)
    result = ke.run(model, samples, config, batch_size=2)  # the same batches as the dataset path: the same floats
    in_memory = ke.to_json(result)
    pipeline.analyze(model, samples, tmp_path, config=config, batch_size=2, png=False, skip_sweep=False, tsne_iter=250)
    report = json.loads((tmp_path / "report.json").read_text())
    assert json.loads(json.dumps(in_memory["config"])) == report["config"]
    assert json.loads(json.dumps(in_memory["aggregate"])) == report["aggregate"]
    assert json.loads(json.dumps(in_memory["samples"])) == report["samples"]
    assert report["aggregate"]["correct"]["token_kinds"]["mutation"] >= 1  # the comparison covers mutation events
    stored = {h["sample"]: h for h in report["hallucination"]}
    live = {s.name: s.hallucination["correct"] for s in result["samples"] if s.hallucination}
    assert live and live.keys() == stored.keys()
    for name, found in live.items():
        assert json.loads(json.dumps({"sample": name, "planted_prior": True, **found})) == stored[name]
