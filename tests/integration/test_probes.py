"""Probe classes on tiny models: lens probes, tuned lens, layer skipping, patching, results."""

import pytest
import torch

from vlm_lens import probes, testing
from vlm_lens.probes import (
    ActivationPatching,
    CosineTrajectory,
    DistributionShift,
    FeatureProjection,
    LayerSkip,
    LogitLens,
    LogitLensProbe,
    ProbeResult,
    TokenTrajectory,
    TunedLens,
    TunedLensProbe,
    lens_pass,
    patch_all_layers,
)  # fmt: skip
from vlm_lens.probes.lens_probes import late_layers

QUESTIONS = ["what color is the star ?", "where is the circle ?", "how many shapes are there ?",
             "what shape is the red one ?", "describe the image ."]  # fmt: skip


@pytest.fixture(scope="module")
def llava_trace(tiny_llava):
    model = tiny_llava.model
    return model.trace_generation(model.prepare(tiny_llava.image, QUESTIONS[0]), max_new_tokens=5)


def test_logit_lens_probe_arrays_and_last_layer(llava_trace):
    result = LogitLensProbe()(llava_trace)
    n = llava_trace.cache.model.n_layers
    steps = llava_trace.n_steps
    assert result["prob"].shape == (n + 1, steps) and result["js_adjacent"].shape == (n, steps)
    assert result["topk_ids"].shape == (n + 1, steps, 5)
    assert torch.equal(result["topk_ids"][-1, :, 0], llava_trace.generated_ids)  # last layer: the emitted tokens
    assert torch.equal(result["rank"][-1], torch.zeros(steps, dtype=torch.long))
    assert result.coords["target"] == llava_trace.generated_tokens
    assert result.provenance["variant"] == "correct" and result.provenance["family"] == "llava"


def test_result_dataframe_figure_roles_and_round_trip(llava_trace, tmp_path):
    result = LogitLensProbe(positions="all")(llava_trace)
    frame = result.to_dataframe("prob")
    assert len(frame) == result["prob"].numel() and set(frame.columns) == {"quantity", "layer", "position", "value"}
    assert frame.iloc[0]["layer"] == "0"  # stack index 0: the embeddings
    assert len(result.to_dataframe()) == sum(v.numel() for v in result.arrays.values())
    figure = result.figure("entropy")
    assert figure.data[0].type == "heatmap"
    roles = result.by_role("entropy")
    assert set(roles) == {"image", "text", "generated"} and roles["image"].shape == (llava_trace.cache.model.n_layers + 1,)
    mask = llava_trace.layout.image
    assert torch.allclose(roles["image"], result["entropy"][:, mask].mean(-1))
    saved = result.save(tmp_path / "lens")
    loaded = ProbeResult.load(saved)
    assert loaded.coords == result.coords and loaded.dims == result.dims
    for name, value in result.arrays.items():
        assert torch.equal(loaded[name], value)
    assert torch.equal(loaded.layout.image, result.layout.image)


def test_token_trajectory_targets(llava_trace):
    generated = TokenTrajectory("generated")(llava_trace)
    lens = LogitLensProbe()(llava_trace)
    assert torch.allclose(generated["prob"][..., 0], lens["prob"])
    candidates = TokenTrajectory("candidates")(llava_trace)
    ids = candidates["target_ids"]
    for step, token in enumerate(llava_trace.generated_ids.tolist()):
        assert token in ids[step].tolist()  # the emitted token is always a candidate
    # the paper's definition, computed plainly: late-layer top-1 ids over full softmaxes, then the emitted token
    model = llava_trace.cache.model
    late = late_layers(model.n_layers)
    stack = llava_trace.cache.resid_stack(llava_trace.step_positions)
    probs = LogitLens().logits(model, stack, range(model.n_layers + 1)).double().softmax(-1)  # [layer, step, vocab]
    for step, token in enumerate(llava_trace.generated_ids.tolist()):
        expected = list(dict.fromkeys(probs[late, step].argmax(-1).tolist() + [token]))
        assert [i for i in ids[step].tolist() if i >= 0] == expected
        for slot, i in enumerate(expected):
            assert torch.allclose(candidates["prob"][:, step, slot].double(), probs[:, step, i], atol=1e-6)
        assert candidates["prob"][:, step, len(expected):].isnan().all()  # padding slots
    # the same trajectory from the knowledge-evolution lens pass, without a second projection
    shared = TokenTrajectory.from_lens_result(LogitLensProbe(top_k=1, candidates=True)(llava_trace))
    assert torch.equal(shared["target_ids"], ids)
    assert torch.allclose(shared["prob"], candidates["prob"], equal_nan=True)
    with pytest.raises(ValueError, match="candidates=True"):
        TokenTrajectory.from_lens_result(lens)
    named = TokenTrajectory(["red", "blue"])(llava_trace)
    assert named["prob"].shape[-1] == 2
    with pytest.raises(ValueError, match="single-token"):
        TokenTrajectory(["red blue"])(llava_trace)


def test_distribution_shift_paper_heatmap(llava_trace):
    paper = DistributionShift("paper")(llava_trace)
    scaled = paper["js_adjacent_scaled"]
    assert torch.allclose(scaled.abs().amax(1), torch.ones(scaled.shape[0]), atol=1e-6)  # per transition (column)
    correct = DistributionShift()(llava_trace)
    assert (correct["js_adjacent"] <= torch.log(torch.tensor(2.0)) + 1e-6).all()


def test_cosine_and_projection(tiny_llava, llava_trace):
    cos = CosineTrajectory()(llava_trace)
    assert torch.allclose(cos["final"][-1], torch.ones(llava_trace.n_steps), atol=1e-5)
    model = tiny_llava.model
    sources = [model.run_with_cache(model.prepare(testing.sample_image(s, 32), QUESTIONS[0]),
                                    names_filter=model.resid_names)[1] for s in range(4)]  # fmt: skip
    across = CosineTrajectory().across(sources)
    assert across["pairwise"].shape == (model.n_layers + 1, 4, 4)
    assert torch.allclose(torch.diagonal(across["pairwise"], dim1=1, dim2=2), torch.ones(model.n_layers + 1, 4), atol=1e-5)
    pca = FeatureProjection("pca")(llava_trace)
    assert pca["coords"].shape == (model.n_layers, llava_trace.n_steps, 2)  # embedding dropped
    tsne = FeatureProjection("tsne", max_iter=250).across(sources)
    assert tsne["coords"].shape == (model.n_layers, 4, 2) and torch.isfinite(tsne["coords"]).all()


def test_tuned_lens_beats_logit_lens_and_round_trips(tiny_llava, tmp_path):
    model = tiny_llava.model
    names = model.resid_names

    def stacks(seeds, questions):
        out = []
        for seed in seeds:
            for q in questions:
                _, cache = model.run_with_cache(model.prepare(testing.sample_image(seed, 32), q), names_filter=names)
                out.append(cache.resid_stack())
        return out

    train, held_out = stacks(range(8), QUESTIONS), stacks(range(100, 104), QUESTIONS)
    lens = TunedLens.for_model(model)
    losses = lens.fit(model, train, steps=150, lr=5e-3)
    assert losses[-1] < losses[0]
    held = torch.cat(held_out, dim=1)
    tuned = lens_pass(model, held, lens=lens, stats=["kl_to_final"]).kl_to_final.mean(1)
    logit = lens_pass(model, held, stats=["kl_to_final"]).kl_to_final.mean(1)
    assert (tuned[:-1] < logit[:-1]).all(), (tuned, logit)
    assert tuned[-1] == pytest.approx(0.0, abs=1e-6)
    lens.save(tmp_path / "lens")
    loaded = TunedLens.load(tmp_path / "lens", model)
    assert torch.equal(loaded.weight, lens.weight) and torch.equal(loaded.bias, lens.bias)
    trace = model.trace_generation(model.prepare(tiny_llava.image, QUESTIONS[0]), max_new_tokens=3)
    assert torch.equal(TunedLensProbe(loaded)(trace)["prob"], TunedLensProbe(lens)(trace)["prob"])


def test_tuned_lens_refuses_another_model(tiny_llava, tiny_qwen25, tmp_path):
    lens = TunedLens(tiny_llava.model.n_layers, tiny_llava.model.d_model, tiny_llava.model.d_vocab, "tiny-llava")
    lens.save(tmp_path / "lens")
    with pytest.raises(ValueError, match="trained for a model"):
        TunedLens.load(tmp_path / "lens", tiny_qwen25.model)


def test_layer_skip_of_nothing_changes_nothing(llava_trace):
    result = LayerSkip([])(llava_trace)
    assert result["kl"].abs().max() <= 1e-6
    assert result["forced_agreement"].min() == 1.0 and result["generation_agreement"].item() == 1.0
    assert torch.equal(result["generated_ids"], llava_trace.generated_ids)


def test_skipping_through_hooks_equals_a_plain_torch_hook(tiny_llava, llava_trace):
    model = tiny_llava.model
    layer = 2
    reference = tiny_llava.reference
    block = reference.model.language_model.layers[layer]
    handle = block.register_forward_hook(lambda module, args, output: args[0])  # output := input
    try:
        with torch.no_grad():
            expected = reference(**llava_trace.inputs.model_inputs).logits
            expected_ids = reference.generate(**llava_trace.prompt_inputs.model_inputs, max_new_tokens=llava_trace.n_steps,
                                              do_sample=False, suppress_tokens=model.placeholder_ids,
                                              )[0, llava_trace.prompt_inputs.input_ids.shape[1]:]  # fmt: skip
    finally:
        handle.remove()
    skipped = model.run_with_hooks(llava_trace.inputs, fwd_hooks=probes.skip_layer_hooks([layer]))
    assert (skipped - expected).abs().max() <= 1e-5
    result = LayerSkip([layer])(llava_trace)
    eos = model.tokenizer.eos_token_id
    if eos in expected_ids.tolist():
        expected_ids = expected_ids[: expected_ids.tolist().index(eos) + 1]
    assert torch.equal(result["generated_ids"], expected_ids.cpu())
    sweep = LayerSkip().sweep(llava_trace)
    assert sweep["kl"].shape == (model.n_layers,) and (sweep["kl"] > 0).all()


def test_patching_every_layer_reproduces_the_source(tiny_llava):
    model = tiny_llava.model
    target = model.prepare(testing.sample_image(1, 32), QUESTIONS[0])
    source = model.prepare(testing.sample_image(2, 32), QUESTIONS[0])
    source_logits = model.run_with_hooks(source)
    patched = patch_all_layers(model, target, source)
    assert (patched - source_logits).abs().max() <= 1e-5
    result = ActivationPatching()(target, source, "red", "blue", model=model)
    assert result["effect"].shape == (model.n_layers,)
    assert result["effect"][-1].item() == pytest.approx(1.0, abs=1e-4)  # the last residual is the whole answer
    grid = ActivationPatching(layers=[0, 3], per_position=True)(target, source, "red", "blue", model=model)
    assert grid["effect"].shape == (2, target.layout.n_positions)
    assert grid.dims["effect"] == ("decoder_layer", "position") and grid.coords["decoder_layer"] == ["0", "3"]
    # the hook by suffix, TransformerLens short name or full name: the same patch of block 2's attention output
    by_suffix = ActivationPatching(layers=[2], hook="hook_attn_out")(target, source, "red", "blue", model=model)
    by_short = ActivationPatching(layers=[2], hook="attn_out")(target, source, "red", "blue", model=model)
    by_name = ActivationPatching(hook="blocks.2.hook_attn_out")(target, source, "red", "blue", model=model)
    assert by_name.coords["decoder_layer"] == ["2"]
    assert torch.equal(by_suffix["logit_diff"], by_short["logit_diff"]) and torch.equal(by_short["logit_diff"], by_name["logit_diff"])
    with pytest.raises(ValueError, match="aligned"):
        ActivationPatching()(target, model.prepare(None, QUESTIONS[0]), "red", "blue", model=model)


def test_registry_and_bad_sources(llava_trace):
    assert {"logit_lens", "tuned_lens", "token_trajectory", "distribution_shift", "cosine_trajectory",
            "feature_projection", "layer_skip", "activation_patching"} <= set(probes.PROBES)  # fmt: skip
    with pytest.raises(TypeError, match="GenerationTrace"):
        LogitLensProbe()(torch.zeros(3))
    with pytest.raises(ValueError, match="needs a class attribute"):
        probes.register_probe(type("Nameless", (probes.Probe,), {}))
    with pytest.raises(ValueError, match="GenerationTrace"):
        LogitLensProbe()(llava_trace.cache)  # positions="steps" needs the trace
    assert LogitLensProbe(positions="last_prompt")(llava_trace.cache)["prob"].shape[1] == 1


def test_distribution_shift_from_a_lens_result_equals_its_own_pass(llava_trace):
    for variant in ("correct", "paper"):
        own = DistributionShift(variant)(llava_trace)
        derived = DistributionShift.from_lens_result(LogitLensProbe(variant)(llava_trace))
        for name in own.arrays:
            assert torch.allclose(own[name], derived[name], atol=1e-7), (variant, name)


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
def test_a_cache_and_a_trace_of_the_same_input_give_the_same_numbers(family):
    from conftest import tiny

    model = tiny(family).model
    trace = model.trace_generation(model.prepare(tiny(family).image, "what color is the star ?"), max_new_tokens=4)
    _, cache = model.run_with_cache(trace.inputs, names_filter=model.resid_names)
    assert cache.input_ids.tolist() == trace.inputs.input_ids[0].tolist()  # the cache knows its tokens
    n = trace.inputs.layout.n_positions
    probes_both = [LogitLensProbe(positions="all", top_k=3), DistributionShift(positions="all"),
                   CosineTrajectory(positions="all"), LogitLensProbe(positions=list(range(n - 3, n)))]  # fmt: skip
    for probe in probes_both:
        a, b = probe(trace), probe(cache)
        assert set(a.arrays) == set(b.arrays), probe.name
        for key in a.arrays:
            torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4, msg=f"{probe.name}.{key}")
        for coord in ("target", "token"):
            assert a.coords.get(coord) == b.coords.get(coord), (probe.name, coord)
    steps = LogitLensProbe()(trace)  # the positions predicting generated tokens: exactly the generated tokens
    assert steps.coords["target"] == trace.generated_tokens
    lens = TunedLens.for_model(model)
    with torch.no_grad():
        lens.weight.normal_(0, 0.02)
    a, b = TunedLensProbe(lens, positions="all")(trace), TunedLensProbe(lens, positions="all")(cache)
    torch.testing.assert_close(a["prob"], b["prob"], atol=1e-4, rtol=1e-4)
    a, b = FeatureProjection("pca", positions="all")(trace), FeatureProjection("pca", positions="all")(cache)
    torch.testing.assert_close(a["coords"], b["coords"], atol=1e-4, rtol=1e-4)
    # TokenTrajectory reads the step positions of a trace and the last prompt position of a cache: step 0 is that one
    a, b = TokenTrajectory(["red", "blue"])(trace), TokenTrajectory(["red", "blue"])(cache)
    torch.testing.assert_close(a["prob"][:, :1], b["prob"], atol=1e-4, rtol=1e-4)
