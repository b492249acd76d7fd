"""Corrected decoding: every mode at its neutral setting reproduces plain greedy generation on every family and both
backends; every formula equals a direct re-implementation on random logits; the corrections act where they should."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import FAMILIES, nnsight_twin, tiny
from vlm_lens.experiments.analysis.evidence_decoding import Evidence
from vlm_lens.probes import decoding as D

NEUTRAL = [D.Method(), D.Skip([]), D.DeCo(alpha=0.0), D.DoLa(alpha=0.0), D.VCD(alpha=0.0), Evidence(blend=0.0)]


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
@pytest.mark.parametrize("family", FAMILIES)
def test_neutral_corrections_reproduce_greedy(family, backend):
    t = tiny(family)
    model = t.model if backend == "transformer_lens" else nnsight_twin(family)
    for prompt in ("what color is the star ?", "how many shapes are there ?"):
        inputs = model.prepare(t.image, prompt)
        greedy = model.generate_ids(inputs, 6, stop_at_eos=False)
        for correction in NEUTRAL:
            ids = model.generate(inputs, 6, stop_at_eos=False, correction=correction, return_type="tokens")
            assert ids.tolist() == greedy.tolist(), (correction.name, prompt)
        changed = model.generate(inputs, 6, stop_at_eos=False, correction=D.DoLa(), return_type="result").changed
        assert len(changed) == 6


def direct_deco(final, layers, alpha, top_p):
    p = final.softmax(-1).tolist()
    order = sorted(range(len(p)), key=lambda v: -p[v])
    keep, mass = set(), 0.0
    for v in order:
        if mass >= top_p:
            break
        keep.add(v)
        mass += p[v]
    best, anchor = -1.0, 0
    for j in range(layers.shape[0]):
        q = layers[j].softmax(-1)
        c = max(float(q[v]) for v in keep)
        if c > best:
            best, anchor = c, j
    return [float(final[v] + alpha * best * layers[anchor][v]) if v in keep else -math.inf for v in range(len(p))]


def direct_dola(final, layers, alpha, head):
    def js(a, b):
        p, q = a.softmax(-1).double(), b.softmax(-1).double()
        m = (p + q) / 2
        return float(0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum())

    premature = max(range(layers.shape[0]), key=lambda j: js(final, layers[j]))
    log_n, log_m = final.log_softmax(-1), layers[premature].log_softmax(-1)
    top = float(log_n.max().exp())
    return [float(log_n[v] - alpha * log_m[v]) if float(log_n[v].exp()) >= head * top else -math.inf for v in range(len(final))]


def direct_vcd(logits, contrast, alpha, beta):
    p = logits.softmax(-1)
    return [float((1 + alpha) * logits[v] - alpha * contrast[v]) if float(p[v]) >= beta * float(p.max()) else -math.inf
            for v in range(len(logits))]  # fmt: skip


@pytest.mark.parametrize("seed", range(5))
def test_formulas_equal_their_direct_implementations(seed):
    g = torch.Generator().manual_seed(seed)
    final, layers, contrast = (torch.randn(shape, generator=g) * 3 for shape in ((50,), (4, 50), (50,)))
    for alpha in (0.0, 0.6, 1.0):
        pairs = [(D.deco_scores(final, layers, alpha, 0.9), direct_deco(final, layers, alpha, 0.9)),
                 (D.dola_scores(final, layers, alpha, 0.1), direct_dola(final, layers, alpha, 0.1)),
                 (D.vcd_scores(final, contrast, alpha, 0.2), direct_vcd(final, contrast, alpha, 0.2))]  # fmt: skip
        for ours, theirs in pairs:
            theirs = torch.tensor(theirs)
            assert torch.equal(ours.isinf(), theirs.isinf())
            finite = ~theirs.isinf()
            assert (ours[finite] - theirs[finite]).abs().max() <= 1e-4


def test_noise_follows_the_diffusion_schedule():
    x = torch.ones(2, 3, 4, 4)
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5
    alpha_bar = float(torch.prod(1 - betas[:501]))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    expected = math.sqrt(alpha_bar) * x + math.sqrt(1 - alpha_bar) * noise
    assert (D.noised_pixels(x, 500, seed=3) - expected).abs().max() <= 1e-5
    assert torch.equal(D.noised_pixels(x, 0, seed=3), D.noised_pixels(x, 0, seed=3))


def test_layer_choices_scale_with_depth():
    assert D.DeCo().chosen(32) == list(range(20, 29)) and D.DeCo().chosen(8) == [5, 6, 7]
    assert D.DoLa().chosen(32) == list(range(16, 32, 2)) and D.DoLa(layers="low").chosen(32) == list(range(1, 16, 2))
    assert D.DoLa().chosen(8) == [4, 5, 6, 7]


def test_corrections_act_on_the_planted_prior():
    """On shapes-llava-prior (decoder layers 6-7 planted to answer 'red' about a star): skipping them and the
    evidence-guided correction give the true colour; DoLa and DeCo, whose candidates are the final layer's, do not."""
    from conftest import embedded

    from vlm_lens.zoo import planted

    model = embedded("shapes-llava-prior")
    example = planted.counter_prior(planted.Trigger(), 1)[0]
    inputs = model.prepare(example.image, example.question)
    assert model.generate(inputs, 3) == "red"
    assert model.generate(inputs, 3, correction=D.Skip([6, 7])) == example.answer
    result = model.generate(inputs, 3, correction=Evidence(), return_type="result")
    assert result.text == example.answer and result.changed[0] and result.notes[0]["corrected"]
    assert result.notes[0]["leader"] == example.answer and result.notes[0]["candidate"] == 7
    assert model.generate(inputs, 3, correction=D.DeCo()) == "red"


def test_bad_settings_are_refused(tiny_llava):
    from vlm_lens.errors import InputError

    model = tiny_llava.model
    inputs = model.prepare(tiny_llava.image, "what color is the star ?")
    with pytest.raises(InputError, match="decoder layers are 0..3"):
        model.generate(inputs, 2, correction=D.Skip([9]))
    with pytest.raises(InputError, match="blend"):
        Evidence(blend=2)
    with pytest.raises(InputError, match="noise_step"):
        model.generate(inputs, 2, correction=D.VCD(noise_step=1000))
    with pytest.raises(InputError, match="correction"):
        model.generate(inputs, 2, return_type="result")
    text_only = model.prepare(None, "what color is the star ?")
    with pytest.raises(InputError, match="noised image"):
        model.generate(text_only, 2, correction=D.VCD())


def test_evidence_leaves_refinements_read_off_the_image_alone():
    """The skip test (round 2): on the clean shapes-llava, late position answers overturn an earlier lead ('top-left' ->
    'top') and pass the skip and grounding tests; the blind-overturn test (text cannot see the image in the overturning layers) refuses
    them, so the answers stay greedy's (and true)."""
    import sys
    from pathlib import Path

    from conftest import embedded

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.decoding_scores import SCORE_START, questions
    from vlm_lens.experiments.analysis.evidence import DetectionConfig
    from vlm_lens.zoo import planted

    model = embedded("shapes-llava")
    _, other = questions(planted.Trigger(), 30, SCORE_START)
    refused = []
    skip_test = Evidence(config=DetectionConfig(test="skip", candidate_prob=0.3))
    for e in other:
        inputs = model.prepare(e.image, e.question)
        result = model.generate(inputs, 2, correction=skip_test, return_type="result")
        if result.notes[0].get("overturn_needs_image"):
            refused.append((e.answer, result.text, model.generate(inputs, 2)))
    assert len(refused) >= 2 and all(truth == ours == greedy for truth, ours, greedy in refused), refused


def test_a_correction_that_raises_leaves_no_hook_behind(tiny_llava):
    """Skip hooks, capture hooks and the attention implementation are all put back when a correction raises."""
    model = tiny_llava.model
    inputs = model.prepare(tiny_llava.image, "what color is the star ?")
    greedy = model.generate_ids(inputs, 4, stop_at_eos=False)
    implementation = model.hf_model.config._attn_implementation

    class Broken(D.Skip):
        reads_layers = True

        def scores(self, model, inputs, step):
            raise RuntimeError("inside the step")

    with pytest.raises(RuntimeError, match="inside the step"):
        model.generate(inputs, 4, correction=Broken([1, 2]))
    from vlm_lens.surgery import is_library_hook

    assert model.hf_model.config._attn_implementation == implementation
    for module in model.hf_model.modules():  # the HF modules and the bridge's wrappers alike
        hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
        assert not [h for h in hooks if not is_library_hook(h)], module
    assert model.generate_ids(inputs, 4, stop_at_eos=False).tolist() == greedy.tolist()


def test_evidence_takes_the_runs_other_pictures_as_references():
    """per_sample_corrections: each sample's swap test gets the run's pool in its own rotation, never its own picture;
    a run of one picture falls back to the bundled images; other corrections are shared unchanged."""
    from types import SimpleNamespace

    from vlm_lens.experiments.analysis.evidence_decoding import per_sample_corrections
    from vlm_lens.experiments.analysis.references import image_key
    from vlm_lens.zoo.samples import SAMPLES_DIR

    paths = sorted(SAMPLES_DIR.glob("*.png"))
    samples = [SimpleNamespace(image=p) for p in paths]
    per_sample = per_sample_corrections(Evidence(), samples)
    for i, path in enumerate(paths):
        refs = per_sample(i).references
        assert len(refs) == 4 and image_key(path) not in {image_key(r) for r in refs}
    assert [image_key(r) for r in per_sample(0).references] != [image_key(r) for r in per_sample(1).references]
    alone = per_sample_corrections(Evidence(), samples[:1])(0).references
    assert len(alone) == 4 and image_key(paths[0]) not in {image_key(r) for r in alone}
    dola = D.DoLa()
    assert per_sample_corrections(dola, samples)(3) is dola
    given = Evidence(references=paths[:2])
    assert per_sample_corrections(given, samples)(0) is given
