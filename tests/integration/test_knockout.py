"""AttentionKnockout and the late-image fixtures: the probe against direct computation, and the planted critical
layer as ground truth for the critical-layer detector."""

from __future__ import annotations

import json

import pytest

from vlm_lens.probes import AttentionKnockout
from vlm_lens.probes.knockout import parse_flow, window_for


def test_window_scales_with_depth_and_flows_parse():
    assert [window_for(n) for n in (32, 8, 4, 2, 40)] == [9, 2, 1, 1, 11]
    assert parse_flow("image->last") == (("image",), ("last",))
    assert parse_flow("image+question -> last") == (("image", "question"), ("last",))
    for bad, message in (("image", "from->to"), ("->last", "from->to"), ("pixels->last", "unknown token role")):
        with pytest.raises(ValueError, match=message):
            parse_flow(bad)


def test_relative_change_is_the_direct_formula_and_batches_agree(tiny_llava):
    model = tiny_llava.model
    prompts = ["what color is the star ?", "what shape is the red one ?", "how many shapes are there ?"]
    inputs = [model.prepare(tiny_llava.image, p) for p in prompts]
    probe = AttentionKnockout(("image->last", "question->last"), window=2)
    together = probe.batch(inputs, model=model)
    for sample, result in zip(inputs, together):
        last = sample.layout.last_prompt_position
        base = model(sample)[0, last].softmax(-1)
        target = int(base.argmax())
        assert result.provenance["answer"] == model.tokenizer.convert_ids_to_tokens(target)
        for f, (keys, queries) in enumerate([("image", "last"), ("question", "last")]):
            for w, start in enumerate(result.coords["window"]):
                with model.block_attention(queries, keys, [start, start + 1]):
                    p = model(sample)[0, last].softmax(-1)[target]
                assert abs(float(result["relative_change"][f, w]) - float((p - base[target]) / base[target])) <= 1e-5
        alone = probe(sample, model=model)
        assert (alone["relative_change"] - result["relative_change"]).abs().max() <= 1e-5
    assert together[0].coords["window"] == [0, 1, 2] and together[0].provenance["forwards"] == 7


def test_a_window_longer_than_the_model_is_refused(tiny_llava):
    from vlm_lens.errors import OutOfRangeError

    with pytest.raises(OutOfRangeError, match="longer than the model"):
        AttentionKnockout(window=5)(tiny_llava.model.prepare(tiny_llava.image, "what color is the star ?"),
                                    model=tiny_llava.model)  # fmt: skip


@pytest.fixture(scope="module")
def gate5():
    import vlm_lens

    return vlm_lens.load("shapes-llava-gate5")


def test_the_fixture_block_is_applied_at_load_and_hides_the_image_below_k(gate5):
    """The ground truth itself: up to stack layer k the last position's residual is the same for any image."""
    from vlm_lens.zoo import embedded_path
    from vlm_lens.zoo import shapes_world as sw

    assert gate5.fixture_block is not None and gate5.fixture_block.layers == [0, 1, 2, 3, 4]
    config = json.loads((embedded_path("shapes-llava-gate5") / "attention_block.json").read_text())
    assert config["first_image_layer"] == 5 and config["earliest_critical_stack_layer"] == 6
    evaluation = json.loads((embedded_path("shapes-llava-gate5") / "eval.json").read_text())
    assert evaluation["base_held_out"]["mean"] - evaluation["held_out"]["mean"] <= 0.05
    a, b = (sw.example(sw.HELD_OUT_START + 123_000 + i, task="color", subject="star") for i in range(2))
    stacks = []
    for e in (a, b):
        inputs = gate5.prepare(e.image, "what color is the star ?")
        _, cache = gate5.run_with_cache(inputs, names_filter=gate5.resid_names)
        stacks.append(cache.resid_stack([inputs.layout.last_prompt_position])[:, 0])
    difference = (stacks[0] - stacks[1]).abs().amax(-1)
    assert difference[:6].max() <= 1e-5 and difference[6:].min() > 1e-3


def test_planted_critical_layer_validates_the_detector(gate5):
    """Grounded critical layers of correct answers are >= k+1 = 6 with a median in [6, 8]; on the base (negative
    control) the same detector gives earlier layers; the image->last knockout is flat below k and drops at k."""
    import vlm_lens
    from vlm_lens.experiments.analysis import information_flow
    from vlm_lens.experiments.analysis.records import Sample
    from vlm_lens.zoo import shapes_world as sw

    samples = [Sample(e.image, e.question, e.answer) for e in
               (sw.example(sw.HELD_OUT_START + 124_000 + i, task=t) for i, t in enumerate(["color", "shape"] * 5))]  # fmt: skip
    result = information_flow.run(gate5, samples, ("image->last",))
    grounded = [r["grounded_critical_layer"] for r in result["samples"] if r["correct"]]
    found = [c for c in grounded if c is not None]
    assert len(found) >= 8 and min(found) >= 6 and 6 <= sorted(found)[(len(found) - 1) // 2] <= 8
    curve = result["aggregate"]["mean"]["image->last"]
    assert max(abs(v) for v in curve[:4]) < 0.01 and curve[5] < -0.3  # windows 0-1 .. 3-4, then 5-6
    base = information_flow.run(vlm_lens.load("shapes-llava"), samples, ("image->last",))
    assert min(r["grounded_critical_layer"] for r in base["samples"] if r["grounded_critical_layer"] is not None) < 6
