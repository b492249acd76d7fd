"""The streaming lens pass equals a plain computation over the whole [layer, pos, vocab] tensor."""

import pytest
import torch
from torch import Tensor

from vlm_lens.probes.lens_stats import lens_pass
from vlm_lens.probes.lenses import LogitLens


def reference_lens_statistics(
    model,
    stack: Tensor,
    *,
    lens=None,
    target_ids: Tensor | None = None,
    top_k: int = 5,
    js_variant: str = "correct",
) -> dict[str, Tensor]:
    """The same statistics computed plainly over the whole ``[layer, pos, vocab]`` tensor (for tests only)."""
    from vlm_lens.probes import metrics

    lens = lens or LogitLens()
    n = model.n_layers
    layers = list(range(n + 1))
    logits = lens.logits(model, stack, layers).double()  # [L, P, V]
    probs = logits.softmax(-1)
    final = logits[-1:].expand_as(logits)
    result = {
        "entropy": metrics.entropy(logits),
        "kl_to_final": metrics.kl_divergence(final, logits),
        "js_to_final": metrics.js_divergence(logits, final, js_variant),
        "js_adjacent": metrics.js_divergence(logits[:-1], logits[1:], js_variant),
        "topk_prob": probs.topk(top_k, -1).values,
        "topk_ids": probs.topk(top_k, -1).indices,
    }
    if target_ids is not None:
        ids = target_ids.reshape(stack.shape[1], -1).long().unsqueeze(0).expand(len(layers), -1, -1)
        result["target_prob"] = probs.gather(-1, ids)
        result["target_rank"] = torch.stack(
            [metrics.token_rank(logits, ids[..., t]) for t in range(ids.shape[-1])], dim=-1
        )
    return result


@pytest.mark.parametrize("variant", ["correct", "paper"])
def test_streaming_pass_equals_reference(tiny_family, variant):
    model = tiny_family.model
    trace = model.trace_generation(model.prepare(tiny_family.image, "what color is the star ?"), max_new_tokens=4)
    positions = torch.arange(trace.layout.n_positions)
    stack = trace.cache.resid_stack(positions)
    next_ids = torch.cat([trace.inputs.input_ids[0, 1:].cpu(), trace.generated_ids[-1:]])  # the token each position predicts
    targets = torch.stack([next_ids, torch.zeros_like(next_ids)], dim=-1)
    lens = LogitLens(variant)
    ref = reference_lens_statistics(model, stack, lens=lens, target_ids=targets, top_k=3, js_variant=variant)
    for chunk_rows in (1, 7, 10_000):  # one row at a time, ragged chunks, everything at once
        got = lens_pass(model, stack, lens=lens, target_ids=targets, top_k=3, js_variant=variant, chunk_rows=chunk_rows)
        for name, expected in ref.items():
            value = getattr(got, name)
            assert value.shape == expected.shape, name
            if value.dtype == torch.long:
                agree = (value == expected).float().mean().item()
                assert agree >= 0.99, (name, agree)  # float32 vs float64 may swap exact near-ties
            else:
                assert torch.allclose(value.double(), expected, atol=2e-6, rtol=1e-4), (name, chunk_rows)


def test_logit_lens_last_layer_is_the_next_token_distribution(tiny_family):
    model = tiny_family.model
    inputs = model.prepare(tiny_family.image, "what color is the star ?")
    logits, cache = model.run_with_cache(inputs, names_filter=model.resid_names)
    stats = lens_pass(model, cache.resid_stack(), stats=["topk", "kl_to_final"], top_k=1)
    model_probs = logits[0].float().softmax(-1)
    assert torch.allclose(stats.topk_prob[-1, :, 0], model_probs.max(-1).values, atol=1e-5)
    assert stats.kl_to_final[-1].abs().max() <= 1e-6
    last = model.n_layers
    lens_probs = LogitLens().logits(model, cache.resid_stack()[[last]], [last])[0].softmax(-1)
    assert (lens_probs - model_probs).abs().max() <= 1e-5
    paper = LogitLens("paper").logits(model, cache.resid_stack()[[last]], [last])[0].softmax(-1)
    assert (paper - model_probs).abs().max() <= 1e-5  # the paper lens also ends on the real distribution


def test_paper_lens_skips_the_norm_below_the_last_layer(tiny_llava):
    model = tiny_llava.model
    _, cache = model.run_with_cache(model.prepare(tiny_llava.image, "what ?"), names_filter=model.resid_names)
    stack = cache.resid_stack()
    paper = LogitLens("paper").logits(model, stack[[1]], [1])[0]
    with torch.no_grad():
        raw = model.unembedder.head(stack[1])  # lm_head on the un-normed residual, as the authors' code does
    assert torch.allclose(paper, raw, atol=1e-6)


def test_lens_pass_rejects_bad_requests(tiny_llava):
    model = tiny_llava.model
    _, cache = model.run_with_cache(model.prepare(tiny_llava.image, "what ?"), names_filter=model.resid_names)
    stack = cache.resid_stack()
    with pytest.raises(ValueError, match="unknown statistics"):
        lens_pass(model, stack, stats=["entropy", "vibes"])
    with pytest.raises(IndexError, match="0..4"):
        lens_pass(model, stack, layers=[0, 9])
    with pytest.raises(ValueError, match="full residual stack"):
        lens_pass(model, stack[:2])


def test_blocked_row_dot_matches_a_float64_sum():
    from vlm_lens.probes.metrics import rowdot as _rowdot

    torch.manual_seed(0)
    for vocab in (48, 32000, 32003):  # one block, blocks of 128, no divisor in [16, 256] (plain sum)
        a = torch.rand(3, 5, vocab)
        b = torch.randn(3, 5, vocab)
        expected = (a.double() * b.double()).sum(-1)
        assert torch.allclose(_rowdot(a, b).double(), expected, rtol=1e-5, atol=1e-4 * vocab**0.5 / 100)
        final = b[-1]
        assert torch.allclose(_rowdot(a, final.expand_as(a)).double(), (a.double() * final.double()).sum(-1),
                              rtol=1e-5, atol=1e-4)  # fmt: skip
    with pytest.raises(ValueError, match="same-shaped"):
        _rowdot(torch.ones(2, 3), torch.ones(3))


def test_the_fused_path_of_js_keeps_small_divergences_and_underflow_finite():
    """The lens pass's way of calling the one JS function (shared exp, scratch, checked chunk)."""
    from vlm_lens.probes import metrics

    torch.manual_seed(1)
    logits = torch.randn(2, 4, 500) * 4
    near = logits + 0.03 * torch.randn_like(logits)  # JS ~ 1e-4: H(M) - mean H would be off by ~1 %
    extreme = logits.clone()
    extreme[..., 0] = 200.0  # every other probability underflows to 0 in float32
    for variant in ("correct", "paper"):
        for q_logits in (near, extreme):
            lp, lq = logits.log_softmax(-1), q_logits.log_softmax(-1)
            work = torch.empty((3,) + tuple(lp.shape))
            got = metrics.js_from_logprobs(lp, lq, variant, p=lp.exp(), q=lq.exp(), work=work, checked=True).double()
            expected = metrics.js_divergence(logits.double(), q_logits.double(), variant)
            assert torch.isfinite(got).all()
            assert torch.allclose(got, expected, rtol=2e-3, atol=1e-9), (variant, got, expected)
