"""model.block_attention against a reference written on plain HF: eager attention, the layer's own 4-D mask with the
blocked edges added by a torch pre-hook (no vlm-lens code), on every family and both backends."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.conftest import FAMILIES, nnsight_twin, tiny
from vlm_lens.adapters import adapter_by_family, adapter_for
from vlm_lens.surgery import get_module

PROMPT = "what color is the star ?"
CASES = {  # name: (queries, keys, layers, heads) and the same rule written for the reference
    "last<-image": (("last",), ("image",), [1], None),
    "text<-image, layers 0-1": (("text", "generated"), ("image",), [0, 1], None),
    "question<-image, heads 0 and 2": (("question",), ("image",), [0], [0, 2]),
}


def reference_rule(case: str, ids: torch.Tensor, image_id: int, n_prompt: int, features: bool = True):
    """``blocked(q, k)`` over absolute positions, written out per case; the keys are the image token's positions (for a
    family without image positions, ``features=False``, its marker tokens', which are then text queries too)."""
    image = (ids[0] == image_id).tolist()
    query_image = image if features else [False] * len(image)

    def rule(q: int, k: int) -> bool:
        if not image[k] if k < len(image) else True:
            return False
        if case == "last<-image":
            return q == n_prompt - 1
        if case == "text<-image, layers 0-1":
            return q >= n_prompt or not query_image[q]
        return q < n_prompt - 1 and not query_image[q]

    return rule


def setting(model, inputs, case: str):
    """``(queries, keys, layers, heads)`` of a case for ``model``. A family without image positions (Mllama: the image
    enters through cross-attention layers) refuses the "image" role and its cross-attention layers (asserted in
    :func:`test_families_without_image_positions_refuse_the_image_role`); its cases block the image marker tokens'
    positions instead, in self-attention layers (a case's cross-attention layer is replaced by the first
    self-attention layer)."""
    queries, keys, layers, heads = CASES[case]
    if model.adapter.image_positions:
        return queries, keys, layers, heads
    marks = torch.isin(inputs.input_ids[0].cpu(), torch.tensor(model.placeholder_ids))
    own = [i for i in range(model.n_layers) if i not in model.adapter.cross_layers(model.hf_model.config)]
    return queries, torch.nonzero(marks).flatten().tolist(), sorted({i if i in own else own[0] for i in layers}), heads


@contextlib.contextmanager
def reference_block(hf_model, case: str, ids: torch.Tensor, layers, features: bool = True):
    """Per-layer pre-hooks that add the blocked edges to the mask HF gives the layer (float, eager convention): HF's
    own mask, causal or not (Gemma 3: bidirectional within an image, sliding windows), else causal."""
    heads = CASES[case][3]
    n_heads = hf_model.config.get_text_config().num_attention_heads
    image_id = hf_model.config.image_token_id
    adapter = adapter_for(type(hf_model).__name__)  # the family's module paths
    rule = reference_rule(case, ids, image_id, ids.shape[1], features)
    handles = []

    def make(layer):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"]
            cache = kwargs.get("past_key_values")
            past = 0 if cache is None else cache.get_seq_length(layer)
            q, kv = hidden.shape[1], past + hidden.shape[1]
            own = kwargs.get("attention_mask")
            if own is None:
                own = torch.zeros(1, 1, q, kv).masked_fill(torch.arange(kv)[None, :] > past + torch.arange(q)[:, None],
                                                           torch.finfo(torch.float32).min)  # fmt: skip
            mask = own.expand(1, n_heads, q, own.shape[-1]).clone()
            offset = kv - mask.shape[-1]  # a sliding-window cache keeps only the last keys
            for i in range(q):
                for c in range(mask.shape[-1]):
                    if rule(past + i, offset + c):
                        chosen = range(n_heads) if heads is None else heads
                        mask[0, list(chosen), i, c] = torch.finfo(torch.float32).min
            kwargs["attention_mask"] = mask
            return args, kwargs

        return hook

    for layer in layers:
        attention = get_module(hf_model, f"{adapter.layers}.{layer}.{adapter.attention}")
        handles.append(attention.register_forward_pre_hook(make(layer), with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def backend_model(family: str, backend: str):
    return tiny(family).model if backend == "transformer_lens" else nnsight_twin(family)


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_matches_plain_hf_reference(family, backend):
    t = tiny(family)
    model = backend_model(family, backend)
    inputs = model.prepare(t.image, PROMPT)
    plain = model(inputs)
    _, keys, layers, _ = setting(model, inputs, "text<-image, layers 0-1")
    empty = model.block_attention("generated", keys, layers)  # a prompt forward has no generated position
    with empty:
        assert (model(inputs) - plain).abs().max() <= 1e-6
    for case in CASES:
        queries, keys, layers, heads = setting(model, inputs, case)
        with model.block_attention(queries, keys, layers, heads):
            ours = model(inputs)
            hooked = model.run_with_hooks(inputs, [("blocks.0.hook_resid_post", lambda x, hook: x)])
        assert (hooked - ours).abs().max() <= 1e-6
        with torch.no_grad(), reference_block(t.reference, case, inputs.input_ids, layers, model.adapter.image_positions):
            theirs = t.reference(**inputs.model_inputs).logits
        assert (ours - theirs).abs().max() <= 1e-5, case
        assert (ours - plain).abs().max() > 1e-4, f"{case}: the block changed nothing"
    assert (model(inputs) - plain).abs().max() == 0  # removed on exit


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_and_trace_match_reference(family, backend):
    t = tiny(family)
    model = backend_model(family, backend)
    inputs = model.prepare(t.image, PROMPT)
    case = "text<-image, layers 0-1"
    queries, keys, layers, _ = setting(model, inputs, case)
    with model.block_attention(queries, keys, layers):
        ids = model.generate_ids(inputs, max_new_tokens=4, stop_at_eos=False)
        trace = model.trace_generation(inputs, max_new_tokens=4, stop_at_eos=False)
    with torch.no_grad(), reference_block(t.reference, case, inputs.input_ids, layers, model.adapter.image_positions):
        out = t.reference.generate(**inputs.model_inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4,
                                   suppress_tokens=model.suppressed_ids(False), return_dict_in_generate=True,
                                   output_logits=True, pad_token_id=model.pad_token_id)  # fmt: skip
    assert ids.tolist() == out.sequences[0, inputs.input_ids.shape[1] :].tolist()
    assert trace.generated_ids.tolist() == ids.tolist()
    assert (trace.step_logits - torch.stack(out.logits)[:, 0]).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_and_eager_agree_on_a_plain_hf_model(family):
    """The block on a plain HF model (no bridge, no nnsight) in both attention implementations."""
    from vlm_lens import testing
    from vlm_lens.attention_block import AttentionBlock

    t = tiny(family)
    inputs = t.model.prepare(t.image, PROMPT)
    _, keys, layers, _ = setting(t.model, inputs, "last<-image")
    out = {}
    for implementation in ("sdpa", "eager"):
        hf_model, _ = testing.build(family)
        hf_model.set_attn_implementation(implementation)
        with torch.no_grad(), AttentionBlock(hf_model, adapter_by_family(family), "last", keys, layers, heads=[1]):
            out[implementation] = hf_model(**inputs.model_inputs).logits
    assert (out["sdpa"] - out["eager"]).abs().max() <= 1e-5
    with torch.no_grad():
        plain = t.reference(**inputs.model_inputs).logits
    assert (out["eager"] - plain).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_forward_equals_one_at_a_time(family):
    """Rows of different lengths (padded on the right): each row's own roles, its own last prompt position."""
    t = tiny(family)
    model = t.model
    prompts = ["what color is the star ?", "what shape is the red one ?"]
    batch = model.prepare([t.image, t.image], prompts)
    _, keys, _, _ = setting(model, batch.samples[0], "last<-image")  # (the marker sits at one position in both rows)
    layers = [i for i in (0, 1, 2) if i not in model.adapter.cross_layers(model.hf_model.config)]
    for queries in ("last", "question"):
        with model.block_attention(queries, keys, layers):
            together = model(batch)
            for row, prompt in enumerate(prompts):
                alone = model(model.prepare(t.image, prompt))[0]
                assert (together[row, : alone.shape[0]] - alone).abs().max() <= 1e-5


@pytest.mark.parametrize("family", [f for f in FAMILIES if not adapter_by_family(f).image_positions])
def test_families_without_image_positions_refuse_the_image_role(family):
    """Mllama's image enters through cross-attention: no position to block, and cross-attention layers (whose keys are
    image features) cannot be blocked by sequence positions. Both refusals name why."""
    from vlm_lens.errors import InputError

    model = tiny(family).model
    with pytest.raises(InputError, match="no image positions"):
        model.block_attention("last", "image", [0])
    cross = model.adapter.cross_layers(model.hf_model.config)
    with pytest.raises(InputError, match="cross-attention layers"):
        model.block_attention("last", "question", cross[:1])


def test_refusals_and_removal_after_a_raise(tiny_llava):
    from vlm_lens.errors import InputError, OutOfRangeError

    model = tiny_llava.model
    inputs = model.prepare(tiny_llava.image, PROMPT)
    plain = model(inputs)
    with pytest.raises(InputError, match="attend to nothing"):
        with model.block_attention("last", "all", [0]):
            model(inputs)
    with pytest.raises(RuntimeError, match="inside"):
        with model.block_attention("last", "image", [0]):
            raise RuntimeError("inside")
    assert (model(inputs) - plain).abs().max() == 0
    with pytest.raises(InputError, match="unknown token role 'images'"):
        model.block_attention("images", "image", [0])
    with pytest.raises(OutOfRangeError, match="decoder layers 0..3"):
        model.block_attention("last", "image", [4])
    with pytest.raises(InputError, match="queries is empty"):
        model.block_attention([], "image", [0])
    with pytest.raises(OutOfRangeError, match="heads 0..3"):
        model.block_attention("last", "image", [0], heads=[7])
    with pytest.raises(OutOfRangeError, match="outside"):
        with model.block_attention([99], "image", [0]):
            model(inputs)


def test_batched_traces_equal_single_traces_under_a_block(tiny_qwen25):
    model = tiny_qwen25.model
    prompts = ["what color is the star ?", "what shape is the red one ?"]
    samples = [model.prepare(tiny_qwen25.image, p) for p in prompts]
    with model.block_attention(("text", "generated"), "image", [0, 1]):
        together = model.trace_batch(samples, max_new_tokens=3, stop_at_eos=False)
        alone = [model.trace_generation(s, max_new_tokens=3, stop_at_eos=False) for s in samples]
    plain = model.trace_generation(samples[0], max_new_tokens=3, stop_at_eos=False)
    for a, b in zip(together, alone):
        assert a.generated_ids.tolist() == b.generated_ids.tolist()
        assert (a.step_logits - b.step_logits).abs().max() <= 1e-5
    assert (alone[0].step_logits - plain.step_logits).abs().max() > 1e-4
