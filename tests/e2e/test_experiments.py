"""Experiments on tiny models: detection rules, skip sets, reports (JSON, HTML rendered in headless Chromium)."""

import json
import re
import shutil
import subprocess

import pytest

from vlm_lens import testing
from vlm_lens.experiments.analysis import evidence as ev
from vlm_lens.experiments.analysis import hallucination, layer_skip
from vlm_lens.experiments.analysis import knowledge_evolution as ke
from vlm_lens.experiments.pipeline import analyze
from vlm_lens.experiments.report import charts as C
from vlm_lens.experiments.report import page as R


def test_skip_sets_and_reversal():
    sets = layer_skip.skip_sets(critical=20, mutation=30, n_layers=32)
    assert sets["skip.1"] == list(range(20, 29))
    assert sets["skip.2"] == list(range(29, 32))
    assert sets["skip.3"] == list(range(20, 27))  # keeps the final five of 32
    no_mutation = layer_skip.skip_sets(critical=3, mutation=None, n_layers=8)
    assert no_mutation == {"skip.1": [3, 4, 5, 6], "skip.3": [3, 4, 5, 6]}  # no skip.2 without a mutation stage
    with pytest.raises(ValueError, match="critical < mutation"):
        layer_skip.skip_sets(5, 5, 8)
    assert hallucination.reversal_layer([0.1, 0.6, 0.7, 0.2, 0.1], [0.0, 0.1, 0.2, 0.5, 0.8]) == 3
    assert hallucination.reversal_layer([0.9, 0.8], [0.1, 0.2]) is None


def _row(step, critical, mutation, special=False):
    kind = "mutation" if mutation is not None else ("stable" if critical is not None else "undetermined")
    return ke.TokenEvolution(step, f"t{step}", special, critical, mutation, "x" if mutation else None, None, None, [],
                             kind, 0.9)  # fmt: skip


def _sample(name, rows):
    import torch

    js = torch.full((8, len(rows)), 0.1)  # [transition, token]
    return ke.SampleEvolution(name, "p", "x", None, {"correct": rows}, shift={"correct": {"js_adjacent": js}})


def test_aggregate_reports_a_mutation_stage_only_with_evidence():
    # 10 samples; events on 6 of them (layer 7, critical 4): the bootstrap interval clears 2 %
    with_events = [_sample(f"s{i}", [_row(0, 4, 7 if i < 6 else None), _row(1, 5, None)]) for i in range(10)]
    agg = ke.aggregate(with_events, n_layers=8)["correct"]
    assert agg["event_share"]["events"] == 6 and agg["event_share"]["tokens"] == 20
    assert 0.02 < agg["event_share"]["low"] <= 0.3 <= agg["event_share"]["high"]
    st = agg["stages"]
    assert st["mutation_detected"] and st["mutation_layer"] == 7 and st["critical_layer"] == 4
    assert st["rapid_evolution"] == [0, 4] and st["stabilization"] == [4, 7] and st["mutation"] == [7, 9]
    # one stray event among 20 clean samples: no mutation stage, two stages, and the rows say so
    clean = [_sample(f"c{i}", [_row(0, 3, 6 if i == 0 else None), _row(1, 5, None)]) for i in range(20)]
    agg = ke.aggregate(clean, n_layers=8)["correct"]
    assert agg["event_share"]["events"] == 1 and agg["event_share"]["low"] == 0.0
    st = agg["stages"]
    assert not st["mutation_detected"] and st["mutation"] is None and st["mutation_layer"] is None
    assert st["stabilization"] == [st["critical_layer"], 9]
    # special tokens stay out of the aggregate
    specials = [_sample("s", [_row(0, 4, 7, special=True), _row(1, 5, None)])]
    assert ke.aggregate(specials, n_layers=8)["correct"]["event_share"]["events"] == 0


def test_stage_critical_falls_back_below_the_mutation_layer():
    # clean tokens answer late (critical 7) while events happen at 6 from leaders established at 3
    samples = [_sample(f"s{i}", [_row(0, 3, 6), _row(1, 7, None), _row(2, 7, None)]) for i in range(6)]
    st = ke.aggregate(samples, n_layers=8)["correct"]["stages"]
    assert st["critical_layer"] == 3 and st["critical_source"] == "tokens with events" and st["mutation_layer"] == 6


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
    assert {p.name for p in out.glob(".*")} == {".runs", ".current", ".store.lock"}  # no temporary files left behind
    assert [p.name for p in (out / ".runs").iterdir()] == [(out / ".current").resolve().name]  # the pair, once


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
    from conftest import embedded

    from vlm_lens.experiments.pipeline import default_samples

    model = embedded("shapes-llava-prior")
    out = tmp_path_factory.mktemp("embedded-report")
    return model, analyze(model, default_samples(model), out, png=False), out


def test_main_job_shows_the_planted_mutation(embedded_report):
    model, result, out = embedded_report
    data = json.loads((out / "report.json").read_text())
    n = model.n_layers
    assert data["model"]["planted_prior"]["block"] == [6, 7]
    planted = [s for s in data["samples"] if s["planted_prior"]]
    assert len(planted) == 4 and all(s["generated_text"] == "red" and not s["correct"] for s in planted)
    clean = [s for s in data["samples"] if not s["planted_prior"]]
    assert all(s["correct"] for s in clean)
    stages = data["aggregate"]["correct"]["stages"]
    assert stages["mutation_detected"] and stages["mutation_layer"] in (7, 8)  # inside the fine-tuned block
    assert stages["mutation"] == [stages["mutation_layer"], n + 1]
    events = data["aggregate"]["correct"]["events"]
    assert {e["sample"] for e in events} == {s["name"] for s in planted}  # every event on a planted question, no other
    assert all(e["leader"] == s["answer"] for e in events for s in planted if s["name"] == e["sample"])
    assert {h["sample"] for h in data["hallucination"]} == {s["name"] for s in planted}
    for h in data["hallucination"]:
        assert h["pre_mutation_leader"] == h["correct_token"] and h["reversal_layer"] in (7, 8)
    page = (out / "report.html").read_text()
    assert "Hallucination reversal" in page and "counter-prior" in page and "planted language prior" in page
    # every critical/mutation marker drawn lands on the layer report.json names (numeric stack-layer axis): the
    # aggregate's on aggregate charts (labelled "median over N tokens"), each token's own on its Fig. P chart
    decoder, markers, per_token = json.JSONDecoder(), [], []
    samples = {s["name"]: s for s in data["samples"]}
    for start in [m.end() for m in re.finditer(r"Plotly\.newPlot\('fig\d+', ", page)]:
        traces, end = decoder.raw_decode(page, start)
        layout, _ = decoder.raw_decode(page, end + 2)
        named = [t for t in traces if re.match(r"(critical|mutation) layer \d+ \(", str(t.get("name", "")))]
        markers += [t for t in named if "median over" in t["name"]]
        title = str(layout.get("title", {}).get("text", "")) if isinstance(layout.get("title"), dict) else str(layout.get("title", ""))
        found = re.match(r"(\S+) · step (\d+) ", title)
        if found:
            row = samples[found.group(1)]["tokens"]["correct"][int(found.group(2))]
            drawn = {("critical_layer" if t["name"].startswith("critical") else "mutation_layer"): t["x"][0] for t in named}
            assert all("this token" in t["name"] for t in named), named
            assert drawn.get("critical_layer") == row["critical"] and drawn.get("mutation_layer") == row["mutation"], (title, drawn)
            per_token.append((found.group(1), row["mutation"]))
    assert len(markers) >= 2
    # the clean samples' charts carry no mutation marker; the counter-prior ones carry their own event
    assert any(m is None for name, m in per_token if not samples[name]["planted_prior"])
    assert all(m is None for name, m in per_token if not samples[name]["planted_prior"])
    assert any(m in (7, 8) for name, m in per_token if samples[name]["planted_prior"])
    assert page.count("<img alt='input image' src='data:image/png;base64,") == len(data["samples"])  # every input, inline
    assert "the lens&#x27;s top-1 token by layer" in page or "the lens's top-1 token by layer" in page
    assert "P(generated token) by layer" in page and "layer skipping: accuracy and agreement" in page
    grids = [t for start in [m.end() for m in re.finditer(r"Plotly\.newPlot\('fig\d+', ", page)]
             for t in decoder.raw_decode(page, start)[0] if t.get("texttemplate") == "%{text}"]
    assert grids and all(cell.count("<br>") == 4 for t in grids for row in t["hovertext"] for cell in row)  # top-5 on hover
    for t in markers:
        key = "critical_layer" if t["name"].startswith("critical") else "mutation_layer"
        assert t["x"] == [stages[key], stages[key]] and t["name"].startswith(f"{key.replace('_', ' ')} {stages[key]} "), t
        n = data["aggregate"]["correct"][key]["n"]
        assert t["name"].endswith(f"(median over {n} tokens)" if key == "critical_layer" else f"(median over {n} events)"), t


def test_skip_experiment_on_the_embedded_model(embedded_report):
    model, result, _ = embedded_report
    skip = result["data"]["layer_skip"]
    none = skip["sets"]["none"]
    assert none["skipped_layers"] == [] and none["generation_agreement"] == 1.0 and none["mean_kl"] <= 1e-6
    c, m = skip["critical_layer"], skip["mutation_layer"]
    assert skip["sets"]["skip.1"]["skipped_layers"] == list(range(c, m - 1))
    assert skip["sets"]["skip.2"]["skipped_layers"] == list(range(m - 1, model.n_layers))
    planted = [i for i, s in enumerate(result["data"]["samples"]) if s["planted_prior"]]
    repaired = [skip["sets"]["skip.2"]["texts"][i] == result["data"]["samples"][i]["answer"] for i in planted]
    assert sum(repaired) >= 3  # skip.2 restores the true answer on the counter-prior questions
    assert skip["sets"]["skip.2"]["accuracy"] > none["accuracy"]
    assert set(skip["sweep"]) == {str(i) for i in range(model.n_layers)}


def test_clean_model_reports_no_mutation_stage(tmp_path):
    from conftest import embedded

    from vlm_lens.experiments.pipeline import default_samples

    model = embedded("shapes-llava")
    samples = default_samples(model)
    assert not any(s.planted for s in samples)
    result = analyze(model, samples, tmp_path, png=False, skip_sweep=False, tsne_iter=250)
    agg = result["data"]["aggregate"]["correct"]
    assert agg["event_share"]["events"] == 0 and not agg["stages"]["mutation_detected"]
    assert "no mutation stage detected" in (tmp_path / "report.html").read_text()
    assert "skip.2" not in result["data"]["layer_skip"]["sets"]


def test_compare_aligns_layers_by_relative_depth(tiny_llava, tiny_qwen25):
    from vlm_lens.experiments.analysis import compare

    samples = [ke.Sample(testing.sample_image(1, 32), "what color is the star ?", None, "s1")]
    config = ke.EvolutionConfig(max_new_tokens=3, detection=ev.DetectionConfig(establish_prob=1e-6))  # random models
    result = compare.run(tiny_llava.model, tiny_qwen25.model, samples, config)
    for key in ("a", "b"):
        for variant in ("correct", "paper"):
            v = result[key]["variants"][variant]
            assert v["critical_depth"] == v["critical_layer"] / 4
    assert result["difference"]["correct"]["critical_depth"] == (
        result["b"]["variants"]["correct"]["critical_depth"] - result["a"]["variants"]["correct"]["critical_depth"]
    )


def test_png_names_say_what_the_figures_are():
    import plotly.graph_objects as go

    figures = [R.named(go.Figure(), "stages_median_js"), R.named(go.Figure(), "p_by_layer_shapes_color_1.png"),
               R.named(go.Figure(), "p_by_layer_shapes_color_1.png"), go.Figure(), R.named(go.Figure(), "a/b <c>"),
               R.named(go.Figure(), "token_probs_shapes_caption_6.png_step0")]
    assert R.png_names(figures) == ["stages_median_js", "p_by_layer_shapes_color_1", "p_by_layer_shapes_color_1_2",
                                    "figure_04", "a_b_c", "token_probs_shapes_caption_6_step0"]


def test_stage_chart_on_a_log_axis_keeps_its_markers():
    stages = {"rapid_evolution": [0, 3], "stabilization": [3, 6], "mutation": [6, 9], "critical_layer": 3,
              "mutation_layer": 6, "last_layer": 8, "mutation_detected": True}  # fmt: skip
    js = [2.0, 0.01, 0.008, 0.01, 0.012, 0.02, 0.015, 0.0]  # one transition dwarfs the rest, one is exactly 0
    fig = C.stage_profile([str(i) for i in range(9)], [f"{i}→{i + 1}" for i in range(8)], js, stages, "t")
    assert fig.layout.yaxis.type == "log"
    markers = [t for t in fig.data if t.name and t.name.startswith(("critical layer", "mutation layer"))]
    assert len(markers) == 2 and all(t.y[0] > 0 for t in markers)  # drawable on a log axis


def test_hallucination_reuses_the_analysis_and_agrees_with_a_fresh_pass(embedded_report):
    from vlm_lens.experiments.analysis import hallucination
    from vlm_lens.experiments.pipeline import default_samples

    model, result, _ = embedded_report
    data = result["data"]
    sample = next(s for s in data["samples"] if s["planted_prior"])
    image = next(x.image for x in default_samples(model) if x.name == sample["name"])
    trace = model.trace_generation(model.prepare(image, "what color is the star ?"), max_new_tokens=3)
    fresh = hallucination.analyze(trace, sample["answer"])  # its own lens pass
    reported = next(h for h in data["hallucination"] if h["sample"] == sample["name"])
    for key in ("pre_mutation_leader", "mutation_layer", "reversal_layer", "critical_layer"):
        assert fresh[key] == reported[key], key


def test_the_report_defines_its_lenses_and_says_what_each_section_shows(embedded_report):
    """Summary: the lenses defined, layer statistics as the integers they are; distribution shift on the sample with
    the most tokens, the authors' heatmap only with enough rows (said otherwise); t-SNE points carry a layer cue;
    skip sets count the repaired counter-prior answers."""
    from vlm_lens.experiments.report.sections import MIN_HEATMAP_ROWS

    model, result, out = embedded_report
    data = json.loads((out / "report.json").read_text())
    page = (out / "report.html").read_text()
    assert "Lenses: the correct lens reads every layer through the model" in page
    summary = page[page.index("<th>lens</th>"): page.index("</table>", page.index("<th>lens</th>"))]
    assert re.search(r"<td>correct lens</td>(<td>\d+</td>){4}<td>", summary), summary  # layers: 4, not 4.000
    longest = max(data["samples"], key=lambda s: len(s["tokens"]["correct"]))
    assert f"Adjacent-layer JS per generated token of {longest['name']}, the sample with the most generated" in page
    assert ("paper heatmap: authors" in page) == (len(longest["tokens"]["correct"]) >= MIN_HEATMAP_ROWS)
    assert "each point larger the deeper its layer" in page and "Fig. P" not in page
    sizes = [t["marker"]["size"] for start in [m.end() for m in re.finditer(r"Plotly\.newPlot\('fig\d+', ", page)]
             for t in json.JSONDecoder().raw_decode(page, start)[0] if t.get("mode") == "markers" and isinstance(t.get("marker", {}).get("size"), list)]
    assert sizes and any(len(set(s)) > 1 for s in sizes)  # marker sizes vary with the layer
    assert data["layer_skip"]["sets"]["skip.2"]["planted_restored"] == {"restored": 4, "of": 4}
    assert data["layer_skip"]["sets"]["skip.1"]["planted_restored"]["of"] == 4


def test_the_report_maps_the_answer_onto_the_image_where_the_object_is(tmp_path):
    """A fixture image whose asked object sits in cell 5 (row 1, col 2): on shapes-qwen2-vl the answer's hottest image
    token at the middle layer is that cell (docs/experiments.md: colour pointing 0.55 there), in report.json and in the
    overlay the page draws; the page renders in headless Chromium."""
    import shutil
    import subprocess

    from typer.testing import CliRunner

    from vlm_lens.experiments.cli import app
    from vlm_lens.zoo import shapes_world as sw

    example = sw.example(40_000_006, task="color")
    asked = next(o for o in example.objects if o.color == example.answer)
    assert (example.answer, asked.cell) == ("purple", 5)
    example.image.save(tmp_path / "square.png")
    result = CliRunner().invoke(app, ["analyze", "--model", "shapes-qwen2-vl", "--image", str(tmp_path / "square.png"),
                                      "--prompt", example.question, "--max-new-tokens", "2", "--no-png",
                                      "--no-skip-sweep", "--out", str(tmp_path / "r")])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    patch_map = data["patch_maps"]["square.png"]
    assert patch_map["token"] == "purple" and patch_map["grid"] == [3, 3]
    middle = len(patch_map["prob"]) // 2
    flat = [p for row in patch_map["prob"][middle] for p in row]
    assert flat.index(max(flat)) == asked.cell
    page = (tmp_path / "r" / "report.html").read_text()
    assert "Where in the image" in page and "square.png: P(purple) on the image tokens" in page
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:  # the overlay is drawn: one heatmap per layer over the image
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                              "--dump-dom", (tmp_path / "r" / "report.html").resolve().as_uri()],
                             capture_output=True, text=True, timeout=120).stdout  # fmt: skip
        assert "square.png: P(purple) on the image tokens" in dom and dom.count("class=\"hm\"") >= 3
    off = CliRunner().invoke(app, ["analyze", "--model", "shapes-qwen2-vl", "--image", str(tmp_path / "square.png"),
                                   "--prompt", example.question, "--max-new-tokens", "2", "--no-png", "--no-skip-sweep",
                                   "--patch-maps", "0", "--out", str(tmp_path / "off")])  # fmt: skip
    assert off.exit_code == 0, off.output  # --patch-maps 0: no maps kept, no section
    assert json.loads((tmp_path / "off" / "report.json").read_text())["patch_maps"] == {}
    assert "Where in the image" not in (tmp_path / "off" / "report.html").read_text()
