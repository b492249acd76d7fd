"""Experiments on tiny models: detection rules, skip sets, reports (JSON, HTML rendered in headless Chromium)."""

import json
import shutil
import subprocess

import pytest

from experiments import hallucination, layer_skip
from experiments import knowledge_evolution as ke
from experiments import report as R
from experiments.pipeline import analyze
from vlm_lens import testing


def test_critical_layer_rules():
    prob = [0.0, 0.1, 0.6, 0.3, 0.7, 0.9, 0.95]
    assert ke.critical_layer(prob, 0.5, "stays") == 4  # rises and stays high from layer 4
    assert ke.critical_layer(prob, 0.5, "first") == 2
    assert ke.critical_layer([0.1, 0.2, 0.4], 0.5) is None
    assert ke.critical_layer([0.9, 0.9], 0.5) == 0
    with pytest.raises(ValueError, match="rule"):
        ke.critical_layer(prob, 0.5, "whenever")


def test_mutation_layer_and_flips():
    js = [0.5, 0.1, 0.02, 0.3, 0.05]  # transitions 0->1 ... 4->5
    assert ke.mutation_layer(js, critical=1) == 4  # largest JS after the critical layer: 3->4
    assert ke.mutation_layer(js, critical=None) is None
    assert ke.mutation_layer(js, critical=5) is None
    assert ke.top1_flips([3, 3, 7, 7, 9, 7], after=2) == [4, 5]


def test_skip_sets_and_reversal():
    sets = layer_skip.skip_sets(critical=20, mutation=30, n_layers=32)
    assert sets["skip.1"] == list(range(20, 29))
    assert sets["skip.2"] == list(range(29, 32))
    assert sets["skip.3"] == list(range(20, 27))  # keeps the final five of 32
    with pytest.raises(ValueError, match="critical < mutation"):
        layer_skip.skip_sets(5, 5, 8)
    assert hallucination.reversal_layer([0.1, 0.6, 0.7, 0.2, 0.1], [0.0, 0.1, 0.2, 0.5, 0.8]) == 3
    assert hallucination.reversal_layer([0.9, 0.8], [0.1, 0.2]) is None


def test_aggregate_orders_the_stages():
    def row(crit, mut):
        return ke.TokenEvolution(0, "x", False, crit, mut, [], None, "stable", 0.9)

    import torch
    js = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.01, 0.02, 0.25, 0.03]).unsqueeze(1).repeat(1, 3)  # [transition, token]
    sample = ke.SampleEvolution("s", "p", "x", None, {"correct": [row(3, 6), row(4, 5), row(2, 7)]},
                                shift={"correct": {"js_adjacent": js}})  # fmt: skip
    agg = ke.aggregate([sample], n_layers=8)["correct"]
    assert agg["critical_layer"]["median"] == 3 and agg["mutation_layer"]["median"] == 6
    # stage boundary: the largest median JS after layer 3 is the transition 6 -> 7, so the mutation layer is 7
    assert agg["stages"]["critical_layer"] == 3 and agg["stages"]["mutation_layer"] == 7
    assert agg["stages"]["rapid_evolution"] == [0, 3] and agg["stages"]["mutation"] == [7, 8]


@pytest.fixture(scope="module")
def tiny_report(tiny_llava, tmp_path_factory):
    model = tiny_llava.model
    samples = [ke.Sample(testing.sample_image(i, 32), "what color is the </script><b>star ?", "red", f"s{i}")
               for i in range(3)]  # fmt: skip
    out = tmp_path_factory.mktemp("report")
    result = analyze(model, samples, out, config=ke.EvolutionConfig(max_new_tokens=4), tsne_iter=250, png=False)
    return out, result


def test_report_files_and_json(tiny_report):
    out, result = tiny_report
    data = json.loads((out / "report.json").read_text())
    assert data["model"]["n_layers"] == 4 and len(data["samples"]) == 3
    for sample in data["samples"]:
        for token in sample["tokens"]["correct"]:
            assert set(token) >= {"critical", "mutation", "kind", "step", "token"}
    assert set(data["aggregate"]) == {"correct", "paper", "accuracy"}
    assert len(data["feature_clusters"]["mean_cosine_per_layer"]) == 5
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_report_escapes_token_text(tiny_report):
    out, _ = tiny_report
    page = (out / "report.html").read_text()
    assert "</script><b>star" not in page
    assert "&lt;/script&gt;&lt;b&gt;star" in page  # in the sample table, escaped


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is installed by .ci/run")
def test_report_renders_in_headless_chromium(tiny_report, tmp_path):
    out, _ = tiny_report
    page = (out / "report.html").read_text()
    n_divs = page.count('class="plotly-graph-div"')
    assert n_divs >= 5
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
         (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert dom.count('class="main-svg"') >= n_divs  # every figure was drawn by plotly
    errors = dom.split("id=\"vlm-lens-errors\"", 1)[1].split("</pre>", 1)[0]
    assert errors.split(">", 1)[1].strip() == ""  # no page errors


def test_png_export_batches_or_explains(tmp_path):
    import plotly.graph_objects as go

    paths, notice = R.export_pngs(tmp_path, [go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))])
    assert (paths and (tmp_path / "figure_01.png").stat().st_size > 0) or (notice and notice.startswith("PNG export skipped"))


@pytest.fixture(scope="module")
def embedded_report(tmp_path_factory):
    import vlm_lens
    from experiments.pipeline import default_samples

    model = vlm_lens.load("shapes-llava")
    out = tmp_path_factory.mktemp("embedded-report")
    return model, analyze(model, default_samples(model), out, png=False), out


def test_analyze_on_the_embedded_model_orders_the_stages(embedded_report):
    model, result, out = embedded_report
    data = json.loads((out / "report.json").read_text())
    n = model.n_layers
    for variant in ("correct", "paper"):
        stages = data["aggregate"][variant]["stages"]
        assert stages is not None, variant
        assert 0 < stages["critical_layer"] < stages["mutation_layer"] <= stages["last_layer"] == n
        assert stages["rapid_evolution"] == [0, stages["critical_layer"]]
        assert stages["mutation"] == [stages["mutation_layer"], n]
    for sample in data["samples"]:
        for token in sample["tokens"]["correct"]:
            if token["critical"] is not None and token["mutation"] is not None:
                assert token["critical"] < token["mutation"] <= n
    assert data["aggregate"]["accuracy"] >= 5 / 6


def test_skip_experiment_on_the_embedded_model(embedded_report):
    model, result, _ = embedded_report
    skip = result["data"]["layer_skip"]
    none = skip["sets"]["none"]
    assert none["skipped_layers"] == [] and none["generation_agreement"] == 1.0 and none["mean_kl"] <= 1e-6
    c, m = skip["critical_layer"], skip["mutation_layer"]
    assert skip["sets"]["skip.1"]["skipped_layers"] == list(range(c, m - 1))
    assert skip["sets"]["skip.2"]["skipped_layers"] == list(range(m - 1, model.n_layers))
    assert set(skip["sweep"]) == {str(i) for i in range(model.n_layers)}


def test_compare_aligns_layers_by_relative_depth(tiny_llava, tiny_qwen25):
    from experiments import compare

    samples = [ke.Sample(testing.sample_image(1, 32), "what color is the star ?", None, "s1")]
    config = ke.EvolutionConfig(max_new_tokens=3, threshold=0.0)  # random models: every token "emerges" at once
    result = compare.run(tiny_llava.model, tiny_qwen25.model, samples, config)
    for key in ("a", "b"):
        for variant in ("correct", "paper"):
            v = result[key]["variants"][variant]
            assert v["critical_depth"] == v["critical_layer"] / 4
    assert result["difference"]["correct"]["critical_depth"] == (
        result["b"]["variants"]["correct"]["critical_depth"] - result["a"]["variants"]["correct"]["critical_depth"]
    )
