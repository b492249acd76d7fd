"""TransformerLens conventions on HookedVLM / VLMCache, batched prepare, gradients through the lens, reprs."""

import pytest
import torch

from vlm_lens.batch import VLMBatch
from vlm_lens.cache import act_name

QUESTIONS = ["what color ?", "where is the star in this picture ?"]


def test_model_calls_cfg_and_unembedding(tiny_family):
    model, reference = tiny_family.model, tiny_family.reference
    inputs = model.prepare(tiny_family.image, QUESTIONS[0])
    with torch.no_grad():
        expected = reference(**inputs.model_inputs).logits
    torch.testing.assert_close(model(inputs), expected, atol=1e-5, rtol=1e-5)
    assert model.cfg.n_layers == model.n_layers and model.cfg.d_model == model.d_model
    assert model.W_U.shape == (model.d_model, model.d_vocab)
    assert model.W_U.data_ptr() == model.unembedder.head.weight.data_ptr()  # shared, not copied
    final = model.run_with_cache(inputs, names_filter="ln_final.hook_normalized")[1]["ln_final.hook_normalized"]
    torch.testing.assert_close(final @ model.W_U + (model.unembedder.head.bias if model.unembedder.head.bias is not None else 0),
                               expected, atol=1e-4, rtol=1e-4)  # fmt: skip


def test_token_helpers(tiny_llava):
    model = tiny_llava.model
    inputs = model.prepare(tiny_llava.image, QUESTIONS[0])
    tokens = model.to_str_tokens(inputs)
    assert len(tokens) == inputs.layout.n_positions and tokens[-1] == model.tokenizer.convert_ids_to_tokens(int(inputs.input_ids[0, -1]))
    assert model.to_str_tokens("what color ?") == ["what", "color", "?"]
    assert model.to_str_tokens(model.to_tokens("what color ?")) == ["what", "color", "?"]
    assert model.to_single_token("color") == model.tokenizer.convert_tokens_to_ids("color")
    with pytest.raises(ValueError, match="2 tokens"):
        model.to_single_token("what color")
    with pytest.raises(ValueError, match="not in this model's vocabulary"):
        model.to_single_token("zebra")


def test_cache_indexing_accumulated_and_decomposed(tiny_family):
    model = tiny_family.model
    logits, cache = model.run_with_cache(model.prepare(tiny_family.image, QUESTIONS[0]))
    assert act_name("resid_post", 3) == "blocks.3.hook_resid_post" and act_name("pattern", 0) == "blocks.0.attn.hook_pattern"
    assert act_name("blocks.1.hook_mlp_out") == "blocks.1.hook_mlp_out"
    assert torch.equal(cache["resid_post", 1], cache["blocks.1.hook_resid_post"])
    assert torch.equal(cache["pattern", 0], cache["blocks.0.attn.hook_pattern"])
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert stack.shape == (model.n_layers + 1, 1, cache.layout.n_positions, model.d_model) and labels[0] == "0"
    torch.testing.assert_close(stack[:, 0], cache.resid_stack())
    assert cache.accumulated_resid(layer=2).shape[0] == 3  # TransformerLens: up to the residual entering layer 2
    assert cache.accumulated_resid(layer=0).shape[0] == 1 and cache.accumulated_resid(layer=-1).shape[0] == stack.shape[0]
    assert torch.equal(cache["resid_post", -1], cache[f"blocks.{model.n_layers - 1}.hook_resid_post"])
    assert act_name("attn", 1) == "blocks.1.attn.hook_pattern"
    normed = cache.accumulated_resid(apply_ln=True)
    torch.testing.assert_close(model.unembed(normed[-1], normed=True), logits.float(), atol=1e-4, rtol=1e-4)
    parts, names = cache.decompose_resid(return_labels=True)
    injected = model.n_layers - 1 if model.family == "qwen3-vl" else 0  # deepstack: what is added between blocks
    assert names[:3] == ["embed", "0_attn_out", "0_mlp_out"] and parts.shape[0] == 2 * model.n_layers + 1 + injected
    torch.testing.assert_close(parts.sum(0), cache["resid_post", model.n_layers - 1], atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_the_lens_when_asked(tiny_llava):
    model = tiny_llava.model
    _, cache = model.run_with_cache(model.prepare(tiny_llava.image, QUESTIONS[0]), names_filter=model.resid_names)
    resid = cache.resid_stack()[:, -1].clone().requires_grad_(True)
    assert not model.unembed(resid).requires_grad  # the default records nothing
    logits = model.unembed(resid, grad=True)
    logits[2].log_softmax(-1)[7].backward()
    assert resid.grad[2].abs().sum() > 0 and resid.grad[[0, 1, 3]].abs().sum() == 0
    # the gradient of a logit w.r.t. the residual, by finite differences through the same lens
    direction = torch.randn(model.d_model)
    eps = 1e-3
    plus = model.unembed(resid[2].detach() + eps * direction)[7] - model.unembed(resid[2].detach() + eps * direction).logsumexp(-1)
    minus = model.unembed(resid[2].detach() - eps * direction)[7] - model.unembed(resid[2].detach() - eps * direction).logsumexp(-1)
    assert float((plus - minus) / (2 * eps)) == pytest.approx(float(resid.grad[2] @ direction), rel=2e-2, abs=1e-4)


def test_batched_prepare_equals_one_sample_at_a_time(tiny_family):
    model = tiny_family.model
    batch = model.prepare(tiny_family.image, QUESTIONS)
    assert isinstance(batch, VLMBatch) and len(batch) == 2 and "padded to" in repr(batch)
    logits, cache = model.run_with_cache(batch, names_filter=model.resid_names)
    for i, question in enumerate(QUESTIONS):
        single_logits, single = model.run_with_cache(model.prepare(tiny_family.image, question),
                                                     names_filter=model.resid_names)  # fmt: skip
        view = cache.sample(i)
        n = view.layout.n_positions
        assert n == single.layout.n_positions and torch.equal(view.layout.image, single.layout.image)
        torch.testing.assert_close(view.resid_stack(), single.resid_stack(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[i, :n], single_logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.sample(-1).resid_stack(), cache.sample(1).resid_stack())
    one = model.prepare([tiny_family.image], QUESTIONS[:1])  # a batch of one
    _, one_cache = model.run_with_cache(one, names_filter=model.resid_names)
    assert one_cache.sample(0).input_ids.tolist() == one[0].input_ids[0].tolist()
    if model.adapter.cross_layers(model.hf_model.config):  # Mllama: a batch runs its cross-attention for every row
        with pytest.raises(ValueError, match="give every sample an image"):  # HF skips those layers without one
            model.prepare([tiny_family.image, None], QUESTIONS)
    else:
        mixed = model.prepare([tiny_family.image, None], QUESTIONS)  # a sample without an image
        torch.testing.assert_close(model(mixed)[1, : mixed[1].layout.n_positions], model(mixed[1])[0], atol=1e-5, rtol=1e-5)
    if model.adapter.cross_layers(model.hf_model.config):  # 1 and 2 images: cross_attention_mask shapes differ
        with pytest.raises(ValueError, match="separate batches"):
            model.prepare([tiny_family.image, [tiny_family.image, tiny_family.image]], QUESTIONS)
        one_image, two_images = model.prepare(tiny_family.image, QUESTIONS[0]), model.prepare([tiny_family.image] * 2, QUESTIONS[1])
        with pytest.raises(ValueError, match="separate batches"):  # the generation path refuses them too
            model.trace_batch([one_image, two_images], 2)
    else:
        two = model.prepare([tiny_family.image, [tiny_family.image, tiny_family.image]], QUESTIONS)  # 1 and 2 images
        for i, sample in enumerate(two):
            torch.testing.assert_close(model(two)[i, : sample.layout.n_positions], model(sample)[0], atol=1e-5, rtol=1e-5)
        traced = model.trace_batch(list(two), 2)  # left-padded generation: the same samples, traced together
        for batched, sample in zip(traced, two):
            assert torch.equal(batched.generated_ids, model.trace_generation(sample, 2).generated_ids)
    with pytest.raises(ValueError, match="cache.sample"):
        from vlm_lens.probes import LogitLensProbe

        LogitLensProbe(positions="all")(cache)
    with pytest.raises(ValueError, match="one entry per prompt"):
        model.prepare([tiny_family.image] * 3, QUESTIONS)
    with pytest.raises(ValueError, match="per sample"):
        model.trace_generation(batch)


def test_reprs_are_short(tiny_llava):
    model = tiny_llava.model
    inputs = model.prepare(tiny_llava.image, QUESTIONS[0])
    trace = model.trace_generation(inputs, max_new_tokens=3)
    for text in (repr(inputs), repr(trace), repr(trace.cache), repr(model)):
        assert len(text) < 300 and "tensor(" not in text, text
    assert "image" in repr(inputs) and "steps=3" in repr(trace)


def test_probe_figures_label_positions_with_tokens(tiny_llava):
    from vlm_lens.probes import LogitLensProbe

    model = tiny_llava.model
    trace = model.trace_generation(model.prepare(tiny_llava.image, QUESTIONS[0]), max_new_tokens=3)
    result = LogitLensProbe(positions="all", top_k=2)(trace)
    labels = list(result.figure("prob").data[0].y)
    assert labels[0] == f"0 → {result.coords['target'][0]}".replace("<", "&lt;").replace(">", "&gt;")
    assert all(" → " in label for label in labels)


def test_embedded_tokenizers_read_ordinary_questions():
    import warnings

    from conftest import embedded

    from vlm_lens.zoo import shapes_world as sw

    model = embedded("shapes-llava")

    example = sw.held_out(1, task="color")[0]
    kind = example.question.split()[-2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown-word warning for an ordinary question
        inputs = model.prepare(example.image, f"What color is the {kind.capitalize()}?")
    assert model.to_str_tokens(inputs)[-6:-2] == ["is", "the", kind, "?"]
    assert model.trace_generation(inputs, max_new_tokens=2).text == example.answer  # answered as in training
    with pytest.warns(UserWarning, match=r"'zebra'.*not in the vocabulary"):
        model.prepare(example.image, "what color is the zebra?")


def test_repeated_token_labels_stay_distinct_rows():
    from vlm_lens.probes import ProbeResult

    result = ProbeResult("x", {"v": torch.zeros(3, 4)}, {"v": ("transition", "heatmap_row")},
                         {"transition": ["0→1", "1→2", "2→3"], "heatmap_row": ["the", "</s>", "the", "</s>"]})  # fmt: skip
    labels = list(result.figure("v").data[0].y)
    assert len(set(labels)) == 4 and labels[1] == "1:&lt;/s&gt;"
