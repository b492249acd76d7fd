"""``variant="paper"`` against the authors' literal expressions (paper-spec §3, quirks Q1-Q12).

Each reference below is written the way the authors' scripts compute it (heatmap.py, plot_token_probabilities_area.py,
tsne.py, combined_tsne.py), on the plain HF twin's ``generate(output_hidden_states=True)`` where a model is needed:
``hidden_states[j]`` is the tuple of n+1 states of step j, index 0 the embeddings, index n already final-normed.
"""

import numpy as np
import pytest
import torch

from vlm_lens import testing
from vlm_lens.experiments.analysis import feature_clusters
from vlm_lens.probes import DistributionShift, FeatureProjection, LogitLensProbe, TokenTrajectory
from vlm_lens.probes.base import as_source
from vlm_lens.probes.lens_probes import late_layers
from vlm_lens.probes.metrics import column_max_abs_scale

PROMPT = "what color is the star ?"
MAX_NEW = 50  # the tiny llava generates 46 tokens: more than the heatmap's 40 rows and than t-SNE's perplexity 40


@pytest.fixture(scope="module")
def paired(tiny_llava):
    """A trace of the hooked model and the authors' ``out.hidden_states`` of the same greedy generation."""
    model = tiny_llava.model
    inputs = model.prepare(tiny_llava.image, PROMPT)
    trace = model.trace_generation(inputs, max_new_tokens=MAX_NEW)
    with torch.no_grad():
        out = tiny_llava.reference.generate(**inputs.model_inputs, max_new_tokens=MAX_NEW, do_sample=False,
                                            suppress_tokens=model.placeholder_ids, output_hidden_states=True,
                                            return_dict_in_generate=True)  # fmt: skip
    generated = out.sequences[0, inputs.input_ids.shape[1] :].cpu()
    assert torch.equal(generated[: trace.n_steps], trace.generated_ids)  # same generation, step for step
    assert trace.n_steps > 40
    return trace, out.hidden_states[: trace.n_steps]


class RecordingTSNE:
    """Stands in for ``sklearn.manifold.TSNE``: records the constructor arguments and the matrix it is fitted on."""

    calls: list = []

    def __init__(self, *args, **kwargs):
        assert not args, "TSNE must be called with keyword arguments only"
        self.kwargs = kwargs
        RecordingTSNE.calls.append(self)

    def fit_transform(self, x):
        self.x = np.array(x, copy=True)
        return np.zeros((x.shape[0], 2))


@pytest.fixture
def tsne_stub(monkeypatch):
    import sklearn.manifold

    RecordingTSNE.calls = []
    monkeypatch.setattr(sklearn.manifold, "TSNE", RecordingTSNE)
    return RecordingTSNE


def paper_tsne(perplexity, max_iter=2000):
    """tsne.py / combined_tsne.py: ``TSNE(n_components=2, perplexity=40|35, learning_rate=200, n_iter=2000,
    random_state=0)``, with the defaults that matter spelled out (``init='pca'``, ``method='barnes_hut'``)."""
    return dict(n_components=2, perplexity=perplexity, learning_rate=200, max_iter=max_iter, random_state=0,
                init="pca", method="barnes_hut")  # fmt: skip


def authors_features(hidden_states):
    """tsne.py: the last position of every state of every step, ``np.array(...)[:, 1:, :]`` (embeddings dropped),
    reshaped to ``(T * n, d)`` (token-major), then ``MaxAbsScaler().fit_transform``."""
    from sklearn.preprocessing import MaxAbsScaler

    per_token = np.array([torch.stack([h[0, -1] for h in step]).double().numpy() for step in hidden_states])
    per_token = per_token[:, 1:, :]
    return per_token, MaxAbsScaler().fit_transform(per_token.reshape(-1, per_token.shape[-1]))


def shift_from_lens(trace):
    return DistributionShift.from_lens_result(LogitLensProbe("paper")(trace))


# 1. t-SNE input: HF hidden_states[1:] (raw residuals, then the final-normed last layer) -------------------------
def test_paper_tsne_features_are_hf_hidden_states(paired, tsne_stub):
    trace, hidden_states = paired
    n = trace.cache.model.n_layers
    per_token, scaled = authors_features(hidden_states)  # (T, n, d), (T * n, d)
    paper = FeatureProjection(variant="paper").features(trace)  # [layer 1..n, step, d]
    assert paper.shape == (n, trace.n_steps, trace.cache.model.d_model)
    assert np.allclose(paper.transpose(0, 1).double().numpy(), per_token, atol=1e-5)
    # the matrix handed to t-SNE is the authors' scaled matrix, rows in their order
    FeatureProjection(variant="paper")(trace)
    assert np.allclose(tsne_stub.calls[-1].x, scaled, atol=1e-4)
    # the correct variant keeps the raw residual stream at the last layer too (no norm anywhere)
    correct = FeatureProjection().features(trace)
    assert torch.equal(correct[:-1], paper[:-1])
    raw_last = trace.cache.resid_stack(trace.step_positions)[-1].float()
    assert torch.equal(correct[-1], raw_last) and not torch.allclose(correct[-1], paper[-1], atol=1e-3)


def test_paper_tsne_features_across_images(tiny_llava, tsne_stub):
    """combined_tsne.py: ``hidden_states[location][layer]`` at one position of each image, ``[1:]``, MaxAbs."""
    from sklearn.preprocessing import MaxAbsScaler

    model = tiny_llava.model
    caches, expected = [], []
    for seed in range(3):
        inputs = model.prepare(testing.sample_image(seed, 32), PROMPT)
        caches.append(model.run_with_cache(inputs, names_filter=model.resid_names)[1])
        with torch.no_grad():
            hs = tiny_llava.reference(**inputs.model_inputs, output_hidden_states=True).hidden_states
        expected.append(torch.stack([h[0, -1] for h in hs])[1:].double().numpy())
    FeatureProjection(variant="paper").across(caches, "last_prompt")
    scaled = MaxAbsScaler().fit_transform(np.array(expected).reshape(-1, model.d_model))
    assert np.allclose(tsne_stub.calls[-1].x, scaled, atol=1e-4)


# 2. heatmap: MaxAbs fitted on (and keeping) the first 40 rows -------------------------------------------------------
def test_heatmap_keeps_and_fits_the_first_40_rows(paired):
    from sklearn.preprocessing import MaxAbsScaler

    g = torch.Generator().manual_seed(0)
    m = torch.rand(50, 32, generator=g, dtype=torch.float64)
    m[45:, 3] = 100.0  # beyond row 40: must not influence the scale
    expected = MaxAbsScaler().fit_transform(m.numpy()[:40])  # heatmap.py: all_js[:40], then fit_transform
    ours = column_max_abs_scale(m, rows=40)
    assert ours.shape == (40, 32) and np.allclose(ours.numpy(), expected, atol=1e-15)
    assert torch.equal(column_max_abs_scale(m), column_max_abs_scale(m, rows=None))  # rows=None: every row
    # in DistributionShift: rows = generation steps, columns = transitions
    trace, _ = paired
    for shift in (DistributionShift("paper")(trace), shift_from_lens(trace)):
        js = shift["js_adjacent"].T.double().numpy()  # [step, transition], 46 steps
        heat = shift["js_adjacent_scaled"]
        assert shift.dims["js_adjacent_scaled"] == ("transition", "heatmap_row") and heat.shape[1] == 40
        assert np.allclose(heat.T.double().numpy(), MaxAbsScaler().fit_transform(js[:40]), atol=1e-6)


# 3. candidates: the deduplicated late-layer top-1 tokens, nothing appended -------------------------------------------
def test_candidates_are_late_layer_top1_only(tiny_llava, paired):
    trace, hidden_states = paired
    model, reference = tiny_llava.model, tiny_llava.reference
    n = model.n_layers
    lm_head, norm = reference.lm_head, reference.model.language_model.norm

    def authors_candidates(layers, lens):
        out = []
        for step in hidden_states:  # plot_token_probabilities_area.py
            ids = []
            for layer in layers:
                token = int(lens(step[layer][:, -1, :], layer).argmax(-1))
                if token not in ids:
                    ids.append(token)
            out.append(ids)
        return out

    with torch.no_grad():
        paper_lens = lambda h, layer: lm_head(h)  # noqa: E731  no norm: hidden_states[n] is normed already (Q1)
        correct_lens = lambda h, layer: lm_head(h if layer == n else norm(h))  # noqa: E731
        cases = [("paper", late_layers(n), paper_lens), ("correct", late_layers(n), correct_lens),
                 ("paper", [1, 2], paper_lens)]  # early layers: the emitted token is often none of their top-1s
        for variant, layers, lens in cases:
            expected = authors_candidates(layers, lens)
            trajectory = TokenTrajectory("candidates", variant, candidate_layers=layers)(trace)
            from_pass = LogitLensProbe(variant, candidates=layers)(trace)
            for ids in (trajectory["target_ids"], from_pass["candidate_ids"]):
                assert [[i for i in row if i >= 0] for row in ids.tolist()] == expected, (variant, layers)
            for step, row in enumerate(expected):  # and their probabilities at every layer, softmax of the lens
                probs = torch.stack([torch.softmax(lens(h[:, -1, :], layer).double(), -1)[0]
                                     for layer, h in enumerate(hidden_states[step])])  # [layer, vocab]  # fmt: skip
                assert torch.allclose(trajectory["prob"][:, step, : len(row)].double(), probs[:, row], atol=1e-5)
    # the case that tells "nothing appended" apart: at some steps layers 1-2 never rank the emitted token first,
    # and the candidate set (equal to the literal one above) does not contain it there
    early = TokenTrajectory("candidates", "paper", candidate_layers=[1, 2])(trace)["target_ids"]
    assert any(t not in early[s].tolist() for s, t in enumerate(trace.generated_ids.tolist()))


# 4. t-SNE settings and the perplexity cap -------------------------------------------------------------------------
def test_paper_tsne_settings_and_reported_cap(tiny_llava, paired, tsne_stub):
    trace, _ = paired
    model = tiny_llava.model
    n_points = model.n_layers * trace.n_steps  # 4 x 46 = 184 > 40: no cap
    single = FeatureProjection(variant="paper")(trace)
    assert tsne_stub.calls[-1].kwargs == paper_tsne(40) and tsne_stub.calls[-1].x.shape[0] == n_points
    assert single.provenance["perplexity"] == 40 and single.provenance["perplexity_capped_from"] is None
    assert single.provenance["max_iter"] == 2000 and single.provenance["tsne_method"] == "barnes_hut"
    # too few points: capped to n_points - 1 (sklearn needs perplexity < n_samples), and reported
    short = model.trace_generation(model.prepare(tiny_llava.image, PROMPT), max_new_tokens=3)
    capped = FeatureProjection(variant="paper", max_iter=300)(short)
    m = model.n_layers * short.n_steps
    assert tsne_stub.calls[-1].kwargs == paper_tsne(m - 1, max_iter=300)
    assert capped.provenance["perplexity"] == m - 1 and capped.provenance["perplexity_capped_from"] == 40
    assert capped.provenance["max_iter"] == 300
    # across images: perplexity 35 (combined_tsne.py), capped for 2 traces x 4 layers
    across = FeatureProjection(variant="paper").across([trace, short], "last_prompt")
    assert tsne_stub.calls[-1].kwargs == paper_tsne(2 * model.n_layers - 1)
    assert across.provenance["perplexity_capped_from"] == 35
    # the experiment passes the variant through and reports what sklearn received
    out = feature_clusters.run([trace, short], None, None, variant="paper", max_iter=400)
    assert [c.kwargs for c in tsne_stub.calls[-2:]] == [paper_tsne(40, 400), paper_tsne(2 * model.n_layers - 1, 400)]
    assert out["single"]["tsne"]["perplexity"] == 40 and out["single"]["tsne"]["perplexity_capped_from"] is None
    assert out["across"]["tsne"]["perplexity_capped_from"] == 35 and out["across"]["tsne"]["max_iter"] == 400
    assert out["single"]["tsne"]["features"] == "hf_hidden_states"


def test_layer_groups_without_detected_stages():
    assert feature_clusters.layer_groups(4, 2, None) == ["rapid_evolution"] * 2 + ["stabilization"] * 3
    assert feature_clusters.layer_groups(4, None, None) == ["rapid_evolution"] * 5
    assert feature_clusters.layer_groups(4, None, 3) == ["rapid_evolution"] * 5
    assert feature_clusters.layer_groups(4, 1, 3) == ["rapid_evolution", "stabilization", "stabilization",
                                                      "mutation", "mutation"]  # fmt: skip


# 5. heatmap rows labelled with the token they predict --------------------------------------------------------------
def test_distribution_shift_rows_are_the_predicted_tokens(paired):
    trace, _ = paired
    for shift in (DistributionShift("paper")(trace), shift_from_lens(trace)):
        assert shift.coords["token"] == trace.generated_tokens  # heatmap.py: row j = generated token g_j
        assert shift.coords["heatmap_row"] == trace.generated_tokens[:40]
    inputs = as_source(trace).token_strings(trace.step_positions)
    assert inputs != trace.generated_tokens  # the old labels (input tokens) were off by one


# 6. late_layers ---------------------------------------------------------------------------------------------------
def test_late_layers_match_the_paper_at_32():
    assert late_layers(32) == list(range(20, 33))  # plot_token_probabilities_area.py: range(20, 33)
    # "for a 13b model, consider using layers 20 to 40" is a fixed start, not a scaling: the proportional
    # formula gives 25..40 there (documented in late_layers); the authors' 13B set is candidates=range(20, 41).
    assert late_layers(40) == list(range(25, 41)) != list(range(20, 41))
    assert [late_layers(n)[0] for n in (4, 8, 24)] == [2, 5, 15]
