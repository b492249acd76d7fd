"""Questions about one image share its prefill (vlm_lens.shared_prefix): the traces equal independent ones."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import nnsight_twin
from vlm_lens import testing
from vlm_lens.shared_prefix import PrefixCache, prefix_length

QUESTIONS = ("what color is the star ?", "what shape is the red one ?", "how many shapes are there ?")


def _worst(traces, samples, model) -> float:
    worst = 0.0
    for trace, sample in zip(traces, samples):
        alone = model.trace_generation(sample, 6)
        assert trace.generated_ids.tolist() == alone.generated_ids.tolist()
        assert trace.inputs.input_ids.tolist() == alone.inputs.input_ids.tolist()
        assert trace.step_positions.tolist() == alone.step_positions.tolist()
        worst = max(worst, float((trace.cache.resid_stack() - alone.cache.resid_stack()).abs().max()),
                    float((trace.step_logits - alone.step_logits).abs().max()))  # fmt: skip
    return worst


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_shared_prefix_equals_independent_traces(tiny_family, backend):
    model = tiny_family.model if backend == "transformer_lens" else nnsight_twin(tiny_family.family)
    other = testing.sample_image(2, testing.size_for(tiny_family.family).image_size)
    samples = [model.prepare(tiny_family.image, q) for q in QUESTIONS] + [model.prepare(other, QUESTIONS[0])]
    cache = PrefixCache()
    traces = model.trace_batch(samples, 6, prefixes=cache)
    assert (cache.prefills, cache.shared) == (1, 2)  # one prefill for the three questions; the other image is batched
    later = model.trace_batch(samples[1:3], 6, prefixes=cache)  # the next batch: served from the stored prefix
    assert (cache.prefills, cache.shared) == (1, 4)
    assert _worst(traces + later, samples + samples[1:3], model) <= 1e-5


def test_prefix_is_the_image_and_what_precedes_it(tiny_qwen25, tiny_llava):
    for tiny in (tiny_llava, tiny_qwen25):
        model = tiny.model
        sample = model.prepare(tiny.image, QUESTIONS[0])
        length = prefix_length(model, sample)
        ids = sample.input_ids[0]
        assert bool(torch.isin(ids[length - 1], torch.tensor(model.placeholder_ids)))
        assert not bool(torch.isin(ids[length:], torch.tensor(model.placeholder_ids)).any())
        assert 0 < length < len(ids)


def test_no_image_or_user_hook_is_traced_the_ordinary_way(tiny_llava):
    model = tiny_llava.model
    assert prefix_length(model, model.prepare(None, "what color is the star ?")) is None  # no image: nothing to share
    samples = [model.prepare(tiny_llava.image, q) for q in QUESTIONS[:2]]
    cache = PrefixCache()
    with model.hooks([("blocks.0.hook_resid_post", lambda act, hook: act)]):
        traces = model.trace_batch(samples, 4, prefixes=cache)  # a hook of yours must fire: no shared prefix
    assert (cache.prefills, cache.shared) == (0, 0) and len(traces) == 2


def test_the_last_images_prefix_is_kept_and_replaced():
    cache = PrefixCache(size=1)
    from vlm_lens.shared_prefix import ImagePrefix

    a = ImagePrefix(2, torch.tensor([1, 2]), {"pixel_values": torch.zeros(1, 3)}, [], {})
    b = ImagePrefix(2, torch.tensor([1, 2]), {"pixel_values": torch.ones(1, 3)}, [], {})
    cache.add(a)
    assert cache.find(torch.tensor([1, 2]), {"pixel_values": torch.zeros(1, 3)}) is a
    assert cache.find(torch.tensor([1, 3]), {"pixel_values": torch.zeros(1, 3)}) is None  # other prefix tokens
    cache.add(b)
    assert cache.entries == [b] and cache.find(torch.tensor([1, 2]), {"pixel_values": torch.zeros(1, 3)}) is None



def test_prefixes_of_another_type_are_refused(tiny_llava):
    from vlm_lens.errors import InputTypeError

    model = tiny_llava.model
    samples = [model.prepare(tiny_llava.image, q) for q in QUESTIONS[:2]]
    with pytest.raises(InputTypeError, match="PrefixCache"):
        model.trace_batch(samples, 2, prefixes={})
