"""Batched generation traces (``model.trace_batch``) equal one-at-a-time ``trace_generation``, sample by sample."""

import pytest
import torch
from conftest import tiny

from vlm_lens import testing
from vlm_lens.batch import VLMBatch
from vlm_lens.probes import LogitLensProbe

# (question, image seed) per family: three prompt lengths, so left padding happens; the sample marked by EOS_SAMPLE
# stops at EOS (within 24 steps) before the others (these random tiny models run to the limit otherwise; Qwen2.5-VL's
# never emits EOS, so its batch only runs to the limit: stop_at_eos=False covers the fixed-length case everywhere)
SAMPLES = {
    "llava": [("what color ?", 3), ("how many shapes are there ?", 2), ("what shape is the red one ?", 4)],
    "qwen2-vl": [("what color ?", 3), ("describe the image .", 0), ("what shape is the red one ?", 4)],
    "qwen2.5-vl": [("what color ?", 3), ("describe the image .", 0), ("what shape is the red one ?", 4)],
    "qwen3-vl": [("what color ?", 5), ("describe the image .", 0), ("what shape is the red one ?", 4)],
    "mistral3": [("what color ?", 3), ("how many shapes are there ?", 2), ("what shape is the red one ?", 4)],
}
DEFAULT_SAMPLES = SAMPLES["llava"]  # a family added later: three prompt lengths still make left padding happen
EOS_SAMPLE = {"llava": 1, "qwen2-vl": 1, "qwen3-vl": 0, "mistral3": 0}
MAX_NEW = 24
ATOL = 1e-5


def prepared(family):
    model, size = tiny(family).model, testing.size_for(family).image_size
    return model, [model.prepare(testing.sample_image(seed, size), question) for question, seed in SAMPLES.get(family, DEFAULT_SAMPLES)]


def lens_prob(trace):
    return LogitLensProbe(variant="correct", top_k=5)(trace)["prob"]


def assert_same_trace(batched, single):
    """Everything ``trace_generation`` returns, within float32 noise of a batch-of-one forward."""
    assert torch.equal(batched.generated_ids, single.generated_ids)
    assert batched.generated_tokens == single.generated_tokens and batched.text == single.text
    assert torch.equal(batched.step_positions, single.step_positions)
    assert torch.equal(batched.cache.input_ids, single.cache.input_ids)
    for role in ("image", "text", "generated"):
        assert torch.equal(batched.layout.mask(role), single.layout.mask(role)), role
    assert batched.layout.last_prompt_position == single.layout.last_prompt_position
    assert batched.inputs.model_inputs.keys() == single.inputs.model_inputs.keys()
    for key, value in single.inputs.model_inputs.items():
        assert torch.equal(batched.inputs.model_inputs[key], value), key
    assert batched.prompt_inputs is single.prompt_inputs and batched.capture == single.capture == "generate"
    assert torch.equal(batched.lens_agrees, single.lens_agrees) and bool(batched.lens_agrees.all())
    assert set(batched.cache) == set(single.cache)
    for name in single.cache:
        assert batched.cache[name].shape == single.cache[name].shape, name
    steps = single.step_positions
    assert (batched.cache.resid_stack(steps) - single.cache.resid_stack(steps)).abs().max() <= ATOL
    assert (batched.cache.resid_stack() - single.cache.resid_stack()).abs().max() <= ATOL
    scale = max(1.0, float(single.step_logits.abs().max()))  # logits of these tiny models stay below 1: absolute
    assert batched.step_logits.shape == single.step_logits.shape
    assert (batched.step_logits - single.step_logits).abs().max() <= ATOL * scale
    assert (lens_prob(batched) - lens_prob(single)).abs().max() <= ATOL


@pytest.mark.parametrize("stop_at_eos, max_new", [(True, MAX_NEW), (False, 6)])
def test_batched_traces_equal_one_at_a_time(tiny_family, stop_at_eos, max_new):
    model, samples = prepared(tiny_family.family)
    assert len({s.input_ids.shape[1] for s in samples}) == len(samples)  # different lengths: real left padding
    batched = model.trace_batch(samples, max_new, stop_at_eos=stop_at_eos)
    singles = [model.trace_generation(s, max_new, stop_at_eos=stop_at_eos) for s in samples]
    assert len(batched) == len(samples)
    for b, s in zip(batched, singles):
        assert_same_trace(b, s)
    steps = [t.n_steps for t in singles]
    if not stop_at_eos:
        assert steps == [max_new] * len(samples)
    elif tiny_family.family in EOS_SAMPLE:  # one sample stopped at its EOS while the others went on
        early = EOS_SAMPLE[tiny_family.family]
        assert int(singles[early].generated_ids[-1]) == model.tokenizer.eos_token_id
        assert steps[early] < min(n for i, n in enumerate(steps) if i != early)
        assert batched[early].cache.resid_stack().shape[1] == samples[early].input_ids.shape[1] + steps[early] - 1


def test_images_of_different_sizes_batch_as_they_run_alone(tiny_family):
    """A wide and a tall image in one batch (Pixtral keeps aspect ratios: its pixel_values differ in shape and are
    zero-padded to one batch; Qwen's differ in patch count): each sample's trace equals its own."""
    model, size = tiny_family.model, testing.size_for(tiny_family.family).image_size
    images = [testing.sample_image(seed, size).resize(shape) for seed, shape in ((1, (size, size // 2)), (2, (size // 2, size)))]
    samples = [model.prepare(image, question) for image, question in zip(images, ("what color ?", "what shape is it ?"))]
    batched = model.trace_batch(samples, 4, stop_at_eos=False)
    for b, sample in zip(batched, samples):
        assert_same_trace(b, model.trace_generation(sample, 4, stop_at_eos=False))


def test_a_batch_of_one_and_a_vlm_batch(tiny_qwen25):
    model = tiny_qwen25.model
    sample = model.prepare(tiny_qwen25.image, "what color is the star ?")
    (batched,) = model.trace_batch([sample], 5)
    assert_same_trace(batched, model.trace_generation(sample, 5))
    size = testing.size_for("qwen2.5-vl").image_size
    batch = model.prepare([testing.sample_image(s, size) for s in (1, 2)], ["what color ?", "where is the red star ?"])
    assert isinstance(batch, VLMBatch)  # right-padded for forwards: trace_batch re-pads its samples on the left
    for b, s in zip(model.trace_batch(batch, 4), batch.samples):
        assert_same_trace(b, model.trace_generation(s, 4))


def test_an_active_user_hook_falls_back_to_one_trace_per_sample(tiny_llava):
    model, samples = prepared("llava")
    singles = [model.trace_generation(s, 5) for s in samples]
    calls = []

    def count(activation, hook):
        calls.append(hook.name)
        return activation

    with model.hooks([("blocks.1.hook_resid_post", count)]):
        batched = model.trace_batch(samples, 5)
    assert len(calls) == sum(t.n_steps for t in singles)  # the hook fired at every step of every sample's own run
    for b, s in zip(batched, singles):
        assert_same_trace(b, s)


@pytest.mark.filterwarnings("ignore:.*was never reached")  # nnsight ends its open generation loop this way
def test_the_nnsight_backend_traces_one_sample_at_a_time(tiny_llava, monkeypatch):
    """nnsight records generation its own way (no plain-module capture): one ``trace_generation`` per sample."""
    from vlm_lens import load

    hf_model, processor = testing.build("llava")
    hf_model.set_attn_implementation("eager")
    nn = load(hf_model, processor=processor, backend="nnsight")
    _, samples = prepared("llava")
    seen = []
    one = nn.trace_generation
    monkeypatch.setattr(nn, "trace_generation", lambda x, *args, **kwargs: seen.append(x) or one(x, *args, **kwargs))
    batched = nn.trace_batch(samples, 4)
    assert [id(x) for x in seen] == [id(x) for x in samples]
    for b, s in zip(batched, samples):
        assert torch.equal(b.generated_ids, tiny_llava.model.trace_generation(s, 4).generated_ids)


def test_an_empty_batch_raises(tiny_llava):
    with pytest.raises(ValueError, match="at least one sample"):
        tiny_llava.model.trace_batch([], 4)
