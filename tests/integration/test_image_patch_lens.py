"""ImagePatchLens: the lens at image-token positions on each image's grid, equal to a plain-HF reference on every
family and both backends."""


import pytest
import torch
from conftest import nnsight_twin

from vlm_lens import testing
from vlm_lens.errors import InputError
from vlm_lens.probes import ImagePatchLens
from vlm_lens.surgery import get_module

PROMPT = "what color is the star ?"
WORDS = ["red", "star", "blue"]


def reference_grids(fam, inputs, words, grids):
    """P(word) at every image position and stack layer, on each grid, from the untouched HF twin: the input of decoder
    layer l (what stack index l reads), the raw output of the last layer, then the twin's own final norm and lm_head
    (one grid per image, or per tile, thumbnail and global image)."""
    reference, adapter = fam.reference, fam.model.adapter
    layers = get_module(reference, adapter.layers)
    seen, last = [], {}
    handles = [layer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]),
                                               with_kwargs=True) for layer in layers]  # fmt: skip
    handles.append(layers[-1].register_forward_hook(lambda m, a, out: last.update(raw=out[0] if isinstance(out, tuple) else out)))
    try:
        with torch.no_grad():
            reference(**inputs.model_inputs)
            stack = torch.stack([s[0] for s in seen] + [last["raw"][0]])  # [n + 1, pos, d]
            image = stack[:, inputs.layout.image]
            logits = reference.lm_head(get_module(reference, adapter.final_norm)(image)).double()
    finally:
        for handle in handles:
            handle.remove()
    ids = [fam.model.to_single_token(w) for w in words]
    prob = logits.softmax(-1)[..., ids]  # [layer, image positions, word]
    out, start = [], 0
    for rows, cols in grids:  # one grid per image, or several (a tiling family's thumbnail, then its tiles)
        out.append(prob[:, start : start + rows * cols].reshape(prob.shape[0], rows, cols, len(ids)))
        start += rows * cols
    return out


def refused_without_image_positions(model, inputs) -> bool:
    """A family whose image enters through cross-attention (Mllama: one marker token per image) has no image positions:
    the patch lens refuses (from a trace and from a cache) and so do the grids, naming why. True when it did."""
    if model.adapter.image_positions:
        return False
    trace = model.trace_generation(inputs, max_new_tokens=1)  # the forward and generation themselves work
    with pytest.raises(InputError, match="no image tokens"):
        ImagePatchLens(WORDS)(trace)
    _, cache = model.run_with_cache(inputs, names_filter=model.resid_names)
    with pytest.raises(InputError, match="no image tokens"):
        ImagePatchLens(WORDS)(cache, inputs=inputs)
    with pytest.raises(InputError, match="cross-attention"):
        model.image_grids(inputs)
    return True


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_patch_probabilities_equal_a_plain_hf_reference(tiny_family, backend):
    model = tiny_family.model if backend == "transformer_lens" else nnsight_twin(tiny_family.family)
    inputs = model.prepare(tiny_family.image, PROMPT)
    if refused_without_image_positions(model, inputs):
        return
    trace = model.trace_generation(inputs, max_new_tokens=2)
    result = ImagePatchLens(WORDS, top_k=3)(trace)
    grids = model.image_grids(inputs)  # one per image; a tiling family's image has several (thumbnail, tiles)
    rows, cols = max(r for r, _ in grids), max(c for _, c in grids)
    assert result["prob"].shape == (model.n_layers + 1, len(grids), rows, cols, len(WORDS))
    assert result.dims["prob"] == ("layer", "image", "row", "col", "word") and result.coords["word"] == WORDS
    for index, expected in enumerate(reference_grids(tiny_family, inputs, WORDS, grids)):
        r, c = grids[index]
        assert (result["prob"][:, index, :r, :c].double() - expected).abs().max() <= 1e-6
        top = result["topk_prob"][:, index, :r, :c, 0]  # the top-1 probability bounds every word's
        assert (result["prob"][:, index, :r, :c].max(-1).values <= top + 1e-6).all()
    chosen = ImagePatchLens(WORDS, layers=[1, model.n_layers])(trace)
    assert chosen.coords["layer"] == ["1", str(model.n_layers)]
    torch.testing.assert_close(chosen["prob"], result["prob"][[1, model.n_layers]], rtol=0, atol=0, equal_nan=True)


def test_a_cache_needs_the_inputs_and_words_must_be_one_token(tiny_family):
    model = tiny_family.model
    inputs = model.prepare(tiny_family.image, PROMPT)
    if refused_without_image_positions(model, inputs):
        return
    _, cache = model.run_with_cache(inputs, names_filter=model.resid_names)
    from_cache = ImagePatchLens(WORDS)(cache, inputs=inputs)
    from_trace = ImagePatchLens(WORDS)(model.trace_generation(inputs, max_new_tokens=1))
    torch.testing.assert_close(from_cache["prob"], from_trace["prob"], rtol=0, atol=1e-5, equal_nan=True)  # NaN: past a smaller grid
    with pytest.raises(InputError):
        ImagePatchLens("red")
    with pytest.raises(ValueError):
        ImagePatchLens(["not-a-word-here"])(cache, inputs=inputs)
    try:  # does the family's grid rule read the inputs (Qwen's image_grid_thw, Mistral 3's image_sizes, InternVL's
        # tile runs)? A cache does not keep them; grids read from the config (LLaVA, Gemma 3) need nothing
        model.adapter.grids(model.hf_model.config, None, int(inputs.layout.image.sum()))
    except InputError:
        with pytest.raises(InputError, match="prepared inputs"):
            ImagePatchLens(WORDS)(cache)
    else:  # the grids follow from the number of image tokens (LLaVA, Idefics3): a cache alone is enough
        assert torch.equal(ImagePatchLens(WORDS)(cache)["prob"], from_cache["prob"])


def test_token_ablation_removes_what_the_positions_carry(tiny_llava):
    from vlm_lens.probes import TokenAblation

    model = tiny_llava.model
    inputs = model.prepare(tiny_llava.image, PROMPT)
    image = inputs.layout.positions("image")
    everything = TokenAblation("zero")(inputs, "image", "red", model=model)
    assert everything.coords["condition"] == ["original", "ablated"]
    original = model(inputs)[0, inputs.layout.last_prompt_position].float().softmax(-1)[model.to_single_token("red")]
    assert torch.isclose(everything["answer_prob"][0], original, atol=1e-6)
    assert not torch.isclose(everything["answer_prob"][1], original, atol=1e-4)  # the image mattered
    # by hand: zero the image rows of the language model's input
    zeroed = model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: a.index_fill(1, image, 0.0))])
    expected = zeroed[0, inputs.layout.last_prompt_position].float().softmax(-1)[model.to_single_token("red")]
    assert torch.isclose(everything["answer_prob"][1], expected, atol=1e-6)
    one = TokenAblation("mean", max_new_tokens=3)(inputs, image[:1], "red", model=model)  # generation ran: 2 texts
    assert len(one.provenance["generated"]) == 2 and one.provenance["positions"] == image[:1].tolist()
    with pytest.raises(InputError, match="image-token positions"):
        TokenAblation()(inputs, [int(inputs.layout.last_prompt_position)], "red", model=model)
    with pytest.raises(InputError, match="mode"):
        TokenAblation("blur")


def test_several_images_per_prompt_are_kept_apart(tiny_family):
    model = tiny_family.model
    size = testing.size_for(tiny_family.family).image_size
    images = [testing.sample_image(1, size), testing.sample_image(2, size)]
    inputs = model.prepare(images, "what color is the star ?")
    if refused_without_image_positions(model, inputs):
        assert inputs.model_inputs["cross_attention_mask"].shape[2] == 2  # each image in its own slot
        return
    grids = model.image_grids(inputs)
    per_image = len(model.image_grids(model.prepare(images[0], "what color is the star ?")))  # 1, or 2 with a thumbnail
    assert len(grids) == 2 * per_image
    result = ImagePatchLens(WORDS)(model.trace_generation(inputs, max_new_tokens=1))
    assert result["prob"].shape[1] == len(grids) and result.coords["image"] == [str(i) for i in range(len(grids))]
    _, cache = model.run_with_cache(inputs, names_filter=model.resid_names)
    stack = cache.resid_stack(inputs.layout.positions("image"))  # [layer, image tokens in order, d]
    ids = [model.to_single_token(w) for w in WORDS]
    direct = model.unembed(stack).softmax(-1)[..., ids]
    start = 0
    for index, (rows, cols) in enumerate(grids):  # image i's tokens, row-major, in its own slot
        expected = direct[:, start : start + rows * cols].reshape(-1, rows, cols, len(ids))
        assert (result["prob"][:, index, :rows, :cols] - expected).abs().max() <= 1e-5
        start += rows * cols
