"""The hooked model is exact on the real HF classes: hidden states, logits, unembed, generation traces."""

import pytest
import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch import Tensor

from vlm_lens import roles
from vlm_lens.surgery import get_module

PROMPT = "what color is the star ?"


def reference_forward(fam, inputs):
    """Plain HF forward of the untouched twin, plus the raw output of its last decoder layer."""
    captured = {}
    last = get_module(fam.reference, fam.model.adapter.layers)[-1]  # the family's own path (text_model, language_model)
    handle = last.register_forward_hook(lambda m, a, out: captured.update(raw=out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            out = fam.reference(**inputs.model_inputs, output_hidden_states=True)
    finally:
        handle.remove()
    return out, captured["raw"]


def forward_with(reference, inputs, handles):
    """Run the plain twin once; remove the torch ``handles`` afterwards, even on error."""
    try:
        with torch.no_grad():
            reference(**inputs.model_inputs)
    finally:
        for handle in handles:
            handle.remove()


def test_resid_post_equals_hf_hidden_states(tiny_family):
    model = tiny_family.model
    inputs = model.prepare(tiny_family.image, PROMPT)
    posts = [f"blocks.{i}.hook_resid_post" for i in range(model.n_layers)]
    _, cache = model.run_with_cache(inputs, names_filter=sorted(set(model.resid_names + posts)) + ["ln_final.hook_normalized"])
    ref, raw_last = reference_forward(tiny_family, inputs)
    hidden = ref.hidden_states
    assert len(hidden) == model.n_layers + 1
    assert (cache["blocks.0.hook_resid_pre"] - hidden[0]).abs().max() <= 1e-5
    for i in range(model.n_layers - 1):
        assert (cache[f"blocks.{i}.hook_resid_post"] - hidden[i + 1]).abs().max() <= 1e-5, i
    # HF's last entry is already final-normed; the hook sees the raw block output (docs/hooks.md).
    last = model.n_layers - 1
    assert (cache[f"blocks.{last}.hook_resid_post"] - raw_last).abs().max() <= 1e-5
    assert (cache["ln_final.hook_normalized"] - hidden[-1]).abs().max() <= 1e-5


def test_resid_stack_is_what_each_decoder_layer_reads(tiny_family):
    """Stack index l (1 <= l < n) equals the HF input of decoder layer l; for Qwen3-VL that includes the deepstack
    visual features added after the first layers (so there it differs from the previous layer's output)."""
    model, reference = tiny_family.model, tiny_family.reference
    inputs = model.prepare(tiny_family.image, PROMPT)
    _, cache = model.run_with_cache(inputs, names_filter=model.resid_names)
    seen = []
    handles = [layer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]),
                                               with_kwargs=True) for layer in get_module(reference, model.adapter.layers)]  # fmt: skip
    forward_with(reference, inputs, handles)
    stack = cache.resid_stack()
    for layer in range(model.n_layers):
        assert (stack[layer] - seen[layer][0]).abs().max() <= 1e-5, layer
    if model.family == "qwen3-vl":
        post = model.run_with_cache(inputs, names_filter="blocks.0.hook_resid_post")[1]["blocks.0.hook_resid_post"][0]
        image = inputs.layout.image
        assert (stack[1][image] - post[image]).abs().max() > 1e-3  # deepstack features were added at image positions
        assert (stack[1][~image] - post[~image]).abs().max() <= 1e-6  # and nowhere else
        assert model.resid_names[1] == "blocks.1.hook_resid_pre"


def test_logits_equal_plain_hf_forward(tiny_family):
    model = tiny_family.model
    inputs = model.prepare(tiny_family.image, PROMPT)
    logits, _ = model.run_with_cache(inputs, names_filter=[])
    ref, _ = reference_forward(tiny_family, inputs)
    assert logits.shape == ref.logits.shape
    assert (logits - ref.logits).abs().max() <= 1e-5
    assert (model.run_with_hooks(inputs) - ref.logits).abs().max() <= 1e-5


def test_unembed_of_last_layer_equals_logits(tiny_family):
    model = tiny_family.model
    inputs = model.prepare(tiny_family.image, PROMPT)
    logits, cache = model.run_with_cache(inputs, names_filter=model.resid_names)
    stack = cache.resid_stack()
    assert (model.unembed(stack[-1], model.n_layers) - logits[0]).abs().max() <= 1e-4
    # the HF convention: hidden_states[-1] is normed already, so the norm must not be applied twice
    ref, _ = reference_forward(tiny_family, inputs)
    assert (model.unembed(ref.hidden_states[-1][0], normed=True) - logits[0]).abs().max() <= 1e-4


def test_resid_stack_shape_and_labels(tiny_family):
    model = tiny_family.model
    inputs = model.prepare(tiny_family.image, PROMPT)
    _, cache = model.run_with_cache(inputs, names_filter=model.resid_names)

    @jaxtyped(typechecker=beartype)
    def check(stack: Float[Tensor, "layer pos d_model"], n_layers: int, d_model: int) -> None:
        assert stack.shape[0] == n_layers + 1 and stack.shape[2] == d_model

    stack, labels = cache.resid_stack(return_labels=True)
    check(stack, model.n_layers, model.d_model)
    assert stack.shape[1] == inputs.layout.n_positions
    assert labels == [str(i) for i in range(model.n_layers + 1)]
    image_only = cache.resid_stack(inputs.layout.image)
    assert image_only.shape[1] == int(inputs.layout.image.sum())
    assert torch.equal(cache.resid_stack([2, 0])[:, 1], stack[:, 0])


def test_layout_marks_image_and_text_tokens(tiny_family):
    model = tiny_family.model
    inputs = model.prepare(tiny_family.image, PROMPT)
    layout = inputs.layout
    ids = inputs.input_ids[0].cpu()
    if model.adapter.image_positions:
        assert torch.equal(layout.image, ids == model.image_token_id)
        # tiny models: a 32 px image is a few tokens (LLaVA: 2 x 2; tiling families: tiles, thumbnail, row-end
        # newlines), exactly what the family's grids account for
        n_image = int(layout.image.sum())
        assert 4 <= n_image <= 32 and n_image == sum(r * c for r, c in model.image_grids(inputs))
    else:  # Mllama: one marker token per image, the image enters through cross-attention: no image positions
        assert not layout.image.any() and int((ids == model.image_token_id).sum()) == 1
        assert roles.position_roles(model, inputs)[int(torch.nonzero(ids == model.image_token_id)[0])] == "marker"
    assert torch.equal(layout.text, ~layout.image)
    assert not layout.generated.any()
    assert layout.last_prompt_position == ids.shape[0] - 1
    text_tokens = model.tokenizer.convert_ids_to_tokens(ids[layout.text].tolist())
    if text_tokens[0] == model.tokenizer.bos_token:  # Mllama's processor prepends BOS
        text_tokens = text_tokens[1:]
    assert text_tokens[:2] == ["user", ":"] and text_tokens[-4:] == ["star", "?", "assistant", ":"]


def test_trace_generation_lines_up_with_generated_tokens(tiny_family):
    model = tiny_family.model
    inputs = model.prepare(tiny_family.image, PROMPT)
    trace = model.trace_generation(inputs, max_new_tokens=8)
    n = trace.n_steps
    assert 1 <= n <= 8
    # the HF generation itself, on the untouched twin
    with torch.no_grad():
        ref = tiny_family.reference.generate(**inputs.model_inputs, max_new_tokens=8, do_sample=False,
                                             suppress_tokens=model.placeholder_ids)
    assert torch.equal(trace.generated_ids, ref[0, inputs.input_ids.shape[1] :][:n].cpu())
    # cache positions line up: token j is predicted from step_positions[j] and (but for the last, which is never fed
    # back) sits at step_positions[j] + 1
    full_ids = trace.inputs.input_ids[0].cpu()
    assert full_ids.shape[0] == inputs.input_ids.shape[1] + n - 1 == trace.cache["blocks.0.hook_resid_pre"].shape[1]
    assert torch.equal(full_ids[trace.step_positions[1:]], trace.generated_ids[:-1])
    assert torch.equal(torch.nonzero(trace.layout.generated).flatten(), trace.step_positions[1:])
    assert trace.step_positions[-1] == full_ids.shape[0] - 1
    # the lens at the last layer reproduces every generated token
    last = model.unembed(trace.cache.resid_stack(trace.step_positions)[-1], model.n_layers)
    last[:, model.placeholder_ids] = float("-inf")  # image placeholders are never generated
    assert torch.equal(last.argmax(-1).cpu(), trace.generated_ids)
    assert bool(trace.lens_agrees.all())
    assert trace.generated_tokens == model.tokenizer.convert_ids_to_tokens(trace.generated_ids.tolist())
    assert trace.capture == "generate" and trace.step_logits.shape == (n, model.d_vocab)


def test_capture_during_generation_equals_one_cached_forward(tiny_family):
    model = tiny_family.model
    inputs = model.prepare(tiny_family.image, PROMPT)
    live = model.trace_generation(inputs, max_new_tokens=6, capture="generate")
    again = model.trace_generation(inputs, max_new_tokens=6, capture="reforward")
    assert torch.equal(live.generated_ids, again.generated_ids)
    assert torch.equal(live.inputs.input_ids, again.inputs.input_ids)
    for name in live.cache:
        assert (live.cache[name] - again.cache[name]).abs().max() <= 1e-5, name
    assert (live.step_logits - again.step_logits).abs().max() <= 1e-4
    assert again.logits.shape[1] == again.layout.n_positions
    patterns = model.trace_generation(inputs, max_new_tokens=3, names_filter=["blocks.0.attn.hook_pattern"])
    assert patterns.capture == "reforward"  # attention patterns are not one vector per position
    with pytest.raises(ValueError, match="reforward"):
        model.trace_generation(inputs, max_new_tokens=3, names_filter=["blocks.0.attn.hook_pattern"], capture="generate")


def test_plain_capture_puts_the_bridge_back_and_defers_to_user_hooks(tiny_llava, monkeypatch):
    """Residual-only traces run through the unwrapped HF modules with sdpa; the wrappers, the attention setting and
    the hook points are restored afterwards, also when generation raises, and active user hooks are honoured."""
    model = tiny_llava.model
    inputs = model.prepare(tiny_llava.image, PROMPT)

    def tree():
        return [(name, id(module)) for name, module in model.hf_model.named_modules()]

    before, attention = tree(), model.hf_model.config._attn_implementation
    seen = []
    original_generate = model.greedy_generate

    def spying_generate(*args, **kwargs):
        seen.append((type(_layer0(model)).__name__, model.hf_model.config._attn_implementation))
        return original_generate(*args, **kwargs)

    monkeypatch.setattr(model, "greedy_generate", spying_generate)
    model.trace_generation(inputs, max_new_tokens=3)
    assert seen[-1] == ("LlamaDecoderLayer", "sdpa")
    assert tree() == before and model.hf_model.config._attn_implementation == attention

    def failing_generate(*args, **kwargs):
        raise RuntimeError("generation failure")

    monkeypatch.setattr(model, "greedy_generate", failing_generate)
    with pytest.raises(RuntimeError, match="generation failure"):
        model.trace_generation(inputs, max_new_tokens=3)
    assert tree() == before and model.hf_model.config._attn_implementation == attention
    monkeypatch.setattr(model, "greedy_generate", spying_generate)

    calls = []

    def count(activation, hook):
        calls.append(hook.name)
        return activation

    with model.hooks([("blocks.1.hook_resid_post", count)]):
        model.trace_generation(inputs, max_new_tokens=3)
    assert seen[-1][0] == "BlockBridge" and len(calls) == 3  # the bridge path: the user's hook fired each step
    handle = _layer0(model).register_forward_hook(lambda module, args, out: calls.append("raw"))
    try:  # a raw torch hook on a wrapper would be bypassed by unwrapping: the bridge path again
        model.trace_generation(inputs, max_new_tokens=3)
    finally:
        handle.remove()
    assert seen[-1][0] == "BlockBridge" and calls.count("raw") == 3


def _layer0(model):
    return get_module(model.hf_model, model.adapter.layers)[0]


def test_hooks_are_removed_when_a_hook_raises(tiny_llava):
    model = tiny_llava.model
    inputs = model.prepare(tiny_llava.image, PROMPT)
    before = model.run_with_hooks(inputs)
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.bridge.modules())

    def explode(activation, hook):
        raise RuntimeError("hook failure")

    with pytest.raises(RuntimeError, match="hook failure"):
        model.run_with_hooks(inputs, fwd_hooks=[("blocks.1.hook_resid_post", explode)])
    with pytest.raises(RuntimeError, match="hook failure"):
        with model.hooks([("blocks.0.hook_resid_post", explode)]):
            model.run_with_hooks(inputs)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.bridge.modules()) == n_hooks
    assert torch.equal(model.run_with_hooks(inputs), before)


def test_hooks_modify_the_forward_inside_the_block_only(tiny_llava):
    model = tiny_llava.model
    inputs = model.prepare(tiny_llava.image, PROMPT)
    clean = model.run_with_hooks(inputs)

    def zero(activation, hook):
        return torch.zeros_like(activation)

    with model.hooks([("blocks.2.hook_resid_post", zero)]):
        patched = model.run_with_hooks(inputs)
    assert not torch.allclose(patched, clean)
    assert torch.equal(model.run_with_hooks(inputs), clean)


def test_dropping_mm_token_type_ids_is_caught(tiny_qwen25):
    """Qwen2.5-VL silently computes other logits without mm_token_type_ids: prepare() always provides it."""
    model = tiny_qwen25.model
    inputs = model.prepare(tiny_qwen25.image, PROMPT)
    assert "mm_token_type_ids" in inputs.model_inputs
    with torch.no_grad():
        with_ids = tiny_qwen25.reference(**inputs.model_inputs).logits
        without = {k: v for k, v in inputs.model_inputs.items() if k != "mm_token_type_ids"}
        dropped = tiny_qwen25.reference(**without).logits
    assert (with_ids - dropped).abs().max() > 1e-3  # the exactness test above would fail on such a forward
    derived = model.adapter.derive_inputs(without, model.image_token_id)
    assert torch.equal(derived["mm_token_type_ids"], inputs.model_inputs["mm_token_type_ids"].long())


def test_raw_templated_prompt_is_used_as_is(tiny_llava):
    model = tiny_llava.model
    templated = model.prepare(tiny_llava.image, PROMPT)
    raw = model.prepare(tiny_llava.image, "user : <image> what color is the star ? assistant :")
    assert torch.equal(raw.input_ids, templated.input_ids)


def test_text_only_prompt_has_no_image_tokens(tiny_llava):
    inputs = tiny_llava.model.prepare(None, PROMPT)
    assert not inputs.layout.image.any() and "pixel_values" not in inputs.model_inputs


def test_the_adapter_map_points_where_the_bridge_hooks(tiny_family):
    """Every hook name in the adapter's map reads, on the plain HF twin, exactly what the bridge's hook caches."""
    model, reference = tiny_family.model, tiny_family.reference
    inputs = model.prepare(tiny_family.image, PROMPT)
    points = model.adapter.hook_map(model.n_layers, model.hf_model.config)
    _, cache = model.run_with_cache(inputs, names_filter=list(points))
    seen, handles = {}, []
    for name, point in points.items():
        module = reference
        for part in point.path.split("."):
            module = getattr(module, part)
        if point.side == "output":
            handles.append(module.register_forward_hook(
                lambda m, a, out, key=name: seen.__setitem__(key, out[0] if isinstance(out, tuple) else out)))
        else:
            handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, key=name: seen.__setitem__(key, args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))  # fmt: skip
    forward_with(reference, inputs, handles)
    for name in points:
        ours, theirs = cache[name], seen[name]
        assert ours.shape[-1] == theirs.shape[-1], name
        assert (ours.reshape(theirs.shape) - theirs).abs().max() <= 1e-5, name
