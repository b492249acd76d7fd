"""Skips seeded by a trace's cached prefix (vlm_lens.prefix_skip) equal the naive skip, on every family and both backends."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import nnsight_twin
from vlm_lens.errors import InputError
from vlm_lens.prefix_skip import PassThrough, PrefixSkipper, can_reuse
from vlm_lens.probes import LayerSkip, skip_layer_hooks
from vlm_lens.surgery import get_module

PROMPTS = ("what color is the star ?", "what shape is the red one ?")


def _sets(n_layers: int) -> dict[str, list[int]]:
    singles = {str(i): [i] for i in range(n_layers)}
    return {**singles, "none": [], "pair": [1, 2], "ends": [0, n_layers - 1], "tail": list(range(2, n_layers))}


def _compare(model, image) -> tuple[float, int, int]:
    """Worst |logit difference| against the naive forward, and (sets whose generation continued after a divergence,
    sets compared); asserts the generations equal."""
    worst, continued, compared = 0.0, 0, 0
    for prompt in PROMPTS:
        trace = model.trace_generation(model.prepare(image, prompt), max_new_tokens=8, stop_at_eos=False)
        skipper = PrefixSkipper(trace)
        for name, layers in _sets(model.n_layers).items():
            naive_logits = model.run_with_hooks(trace.inputs, fwd_hooks=skip_layer_hooks(layers))[0, trace.step_positions]
            with model.hooks(skip_layer_hooks(layers)):
                naive_ids = model.generate_ids(trace.prompt_inputs, max_new_tokens=trace.n_steps)
            outcome = skipper.run(layers)
            worst = max(worst, float((naive_logits.float().cpu() - outcome.step_logits).abs().max()))
            assert outcome.generated.tolist() == naive_ids.tolist(), (model.family, prompt, name)
            continued += outcome.diverged_at is not None and outcome.diverged_at < trace.n_steps - 1
            compared += 1
    return worst, continued, compared


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_prefix_skip_equals_naive(tiny_family, backend):
    model = tiny_family.model if backend == "transformer_lens" else nnsight_twin(tiny_family.family)
    worst, continued, compared = _compare(model, tiny_family.image)
    assert worst <= 1e-5, (tiny_family.family, backend, worst)
    assert continued > 0, "no skip set diverged early: the KV-cache continuation was not exercised"
    assert compared == 2 * (model.n_layers + 4)


def test_layer_skip_probe_reuse_equals_naive(tiny_llava):
    model = tiny_llava.model
    trace = model.trace_generation(model.prepare(tiny_llava.image, PROMPTS[0]), max_new_tokens=6)
    sets = _sets(model.n_layers)
    fast = LayerSkip(reuse="prefix").run_sets(trace, sets)
    slow = LayerSkip(reuse="none").run_sets(trace, sets)
    for name in sets:
        assert fast[name].provenance["reuse"] == "prefix" and slow[name].provenance["reuse"] == "none"
        for key in ("kl", "answer_prob", "forced_agreement", "generation_agreement"):
            torch.testing.assert_close(fast[name][key], slow[name][key], atol=1e-5, rtol=1e-4)
        assert fast[name]["generated_ids"].tolist() == slow[name]["generated_ids"].tolist()
        assert fast[name].provenance["generated_text"] == slow[name].provenance["generated_text"]
    sweep_fast, sweep_slow = LayerSkip().sweep(trace), LayerSkip(reuse="none").sweep(trace)
    torch.testing.assert_close(sweep_fast["kl"], sweep_slow["kl"], atol=1e-5, rtol=1e-4)


def test_user_hook_falls_back_to_naive(tiny_llava):
    model = tiny_llava.model
    trace = model.trace_generation(model.prepare(tiny_llava.image, PROMPTS[0]), max_new_tokens=4)
    assert can_reuse(model, trace)
    fired = []
    with model.hooks([("blocks.1.hook_resid_post", lambda act, hook: fired.append(1) or act)]):
        assert not can_reuse(model, trace)
        result = LayerSkip([2])(trace)  # auto: the naive way, so the user's hook fires
        assert result.provenance["reuse"] == "none" and fired
        with pytest.raises(InputError, match="reuse='auto'"):
            LayerSkip([2], reuse="prefix")(trace)
    with pytest.raises(InputError, match="reuse must be"):
        LayerSkip([1], reuse="sometimes")
    lean = model.trace_generation(model.prepare(tiny_llava.image, PROMPTS[0]), 3, names_filter=["blocks.1.hook_resid_post"])
    assert not can_reuse(model, lean) and LayerSkip([1])(lean).provenance["reuse"] == "none"


def test_layers_and_hooks_restored_after_a_raise(tiny_llava):
    model = tiny_llava.model
    trace = model.trace_generation(model.prepare(tiny_llava.image, PROMPTS[1]), max_new_tokens=4)
    layers = get_module(model.hf_model, model.adapter.layers)
    before = [id(m) for m in layers]
    implementation = model.hf_model.config._attn_implementation
    head = get_module(model.hf_model, model.adapter.lm_head)
    head = getattr(head, "original_component", head)

    def boom(module, args, output):
        raise RuntimeError("planted failure")

    handle = head.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="planted failure"):
            PrefixSkipper(trace).run([2])
    finally:
        handle.remove()
    assert [id(m) for m in layers] == before and not any(isinstance(m, PassThrough) for m in model.hf_model.modules())
    assert model.hf_model.config._attn_implementation == implementation
    for module in model.hf_model.modules():
        assert not module._forward_pre_hooks or all("prefix_skip" not in getattr(h, "__module__", "")
                                                    for h in module._forward_pre_hooks.values())  # fmt: skip
    assert PrefixSkipper(trace).run([2]).step_logits.shape == trace.step_logits.shape  # still usable
