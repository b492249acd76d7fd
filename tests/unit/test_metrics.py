"""Metrics equal textbook formulas; the paper variants equal a literal re-implementation of the authors' lines."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_lens.probes import metrics

LN2 = math.log(2)


def logits_pair(seed: int, shape=(3, 11), scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale,
            torch.randn(shape, generator=g, dtype=torch.float64) * scale)


seeds = st.integers(0, 2**31 - 1)
scales = st.floats(0.01, 30.0)


def textbook_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


@settings(max_examples=60, deadline=None)
@given(seeds, scales)
def test_kl_nonnegative_zero_on_equal_and_textbook(seed, scale):
    a, b = logits_pair(seed, scale=scale)
    kl = metrics.kl_divergence(a, b)
    assert (kl >= 0).all()
    assert metrics.kl_divergence(a, a).abs().max() <= 1e-12
    p, q = a.softmax(-1).tolist(), b.softmax(-1).tolist()
    for row in range(len(p)):
        assert abs(kl[row].item() - textbook_kl(p[row], q[row])) <= 1e-6


@settings(max_examples=60, deadline=None)
@given(seeds, scales)
def test_js_symmetric_bounded_zero_on_equal_and_textbook(seed, scale):
    a, b = logits_pair(seed, scale=scale)
    js = metrics.js_divergence(a, b)
    assert torch.allclose(js, metrics.js_divergence(b, a), atol=1e-12)
    assert (js >= 0).all() and (js <= LN2 + 1e-12).all()
    assert metrics.js_divergence(a, a).abs().max() <= 1e-12
    p, q = a.softmax(-1).tolist(), b.softmax(-1).tolist()
    for row in range(len(p)):
        m = [(x + y) / 2 for x, y in zip(p[row], q[row])]
        expected = 0.5 * textbook_kl(p[row], m) + 0.5 * textbook_kl(q[row], m)
        assert abs(js[row].item() - expected) <= 1e-6


def test_js_reaches_ln2_on_disjoint_supports():
    a = torch.tensor([[100.0, -100.0]], dtype=torch.float64)
    assert abs(metrics.js_divergence(a, a.flip(-1)).item() - LN2) <= 1e-9


@settings(max_examples=40, deadline=None)
@given(seeds, scales)
def test_js_paper_variant_is_the_authors_expression(seed, scale):
    a, b = logits_pair(seed, scale=scale)
    # the authors' lines (heatmap.py), literally
    P = F.softmax(a, dim=-1)
    Q = F.softmax(b, dim=-1)
    M = 0.5 * (P + Q)
    kl1 = F.kl_div(F.log_softmax(a, dim=-1), M, reduction="none").mean(-1)
    kl2 = F.kl_div(F.log_softmax(b, dim=-1), M, reduction="none").mean(-1)
    authors = 0.5 * (kl1 + kl2)
    assert torch.allclose(metrics.js_divergence(a, b, variant="paper"), authors, atol=1e-15, rtol=0)
    # and it is the reversed, vocabulary-averaged KL (quirk Q3)
    V = a.shape[-1]
    reverse = 0.5 * (metrics.kl_divergence(torch.log(M), a) + metrics.kl_divergence(torch.log(M), b)) / V
    assert torch.allclose(metrics.js_divergence(a, b, variant="paper"), reverse, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(seeds, scales)
def test_entropy_rank_cosine_textbook(seed, scale):
    a, b = logits_pair(seed, scale=scale)
    p = a.softmax(-1).tolist()
    h = metrics.entropy(a)
    for row in range(len(p)):
        assert abs(h[row].item() - (-sum(x * math.log(x) for x in p[row] if x > 0))) <= 1e-6
    ids = torch.arange(a.shape[0]) % a.shape[1]
    ranks = metrics.token_rank(a, ids)
    for row in range(a.shape[0]):
        assert ranks[row].item() == sum(1 for x in a[row].tolist() if x > a[row, ids[row]].item())
    cos = metrics.cosine_similarity(a, b)
    for row in range(a.shape[0]):
        x, y = np.array(a[row]), np.array(b[row])
        assert abs(cos[row].item() - x @ y / (np.linalg.norm(x) * np.linalg.norm(y))) <= 1e-6


def test_metrics_broadcast_over_leading_dims():
    a, b = logits_pair(0, shape=(2, 3, 7))
    assert metrics.kl_divergence(a, b).shape == (2, 3)
    assert metrics.js_divergence(a, b).shape == (2, 3)
    assert metrics.entropy(a).shape == (2, 3)


def test_column_max_abs_scale_matches_sklearn():
    from sklearn.preprocessing import MaxAbsScaler

    g = torch.Generator().manual_seed(0)
    m = torch.randn(40, 32, generator=g, dtype=torch.float64)
    m[:, 5] = 0.0
    ours = metrics.column_max_abs_scale(m)
    assert np.allclose(ours.numpy(), MaxAbsScaler().fit_transform(m.numpy()), atol=1e-15)
    assert torch.allclose(ours.abs().amax(0)[[0, 1, 31]], torch.ones(3, dtype=torch.float64))


def test_masked_tokens_contribute_nothing_and_nan_is_refused():
    import pytest

    a = torch.tensor([[2.0, 0.5, -1.0, float("-inf")]], dtype=torch.float64)  # the last token masked on both sides
    b = torch.tensor([[1.0, 1.5, 0.0, float("-inf")]], dtype=torch.float64)
    p, q = a[..., :3].softmax(-1)[0].tolist(), b[..., :3].softmax(-1)[0].tolist()
    assert abs(metrics.kl_divergence(a, b).item() - textbook_kl(p, q)) <= 1e-12
    m = [(x + y) / 2 for x, y in zip(p, q)]
    assert abs(metrics.js_divergence(a, b).item() - 0.5 * (textbook_kl(p, m) + textbook_kl(q, m))) <= 1e-12
    assert abs(metrics.entropy(a).item() + sum(x * math.log(x) for x in p)) <= 1e-12
    authors_paper = 0.5 * sum(mi * (2 * math.log(mi) - math.log(x) - math.log(y)) for mi, x, y in zip(m, p, q)) / 4
    assert abs(metrics.js_divergence(a, b, variant="paper").item() - authors_paper) <= 1e-15
    one_sided = b.clone()
    one_sided[0, 1] = float("-inf")  # Q masks a token P gives mass to
    assert metrics.kl_divergence(a, one_sided).item() == float("inf")
    assert metrics.js_divergence(a, one_sided, variant="paper").item() == float("inf")  # the authors' KL(M || Q)
    assert math.isfinite(metrics.js_divergence(a, one_sided).item())  # the correct JS stays <= ln 2
    with pytest.raises(ValueError, match="NaN"):
        metrics.js_divergence(a, torch.full_like(b, float("nan")))
