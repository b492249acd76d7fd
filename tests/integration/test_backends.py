"""Both backends, every family: caches, logits, hooks, traces, patching and probes are equal (TransformerLens vs
nnsight), and the nnsight object is there for interventions of your own."""

import pytest
import torch
from conftest import nnsight_twin

from vlm_lens import load, testing
from vlm_lens.probes import ActivationPatching, LayerSkip, LogitLensProbe, patch_all_layers

PROMPT = "what color is the star ?"


def test_caches_logits_and_hooks_are_equal(tiny_family):
    tl, nn = tiny_family.model, nnsight_twin(tiny_family.family)
    assert nn.backend == "nnsight" and nn.n_layers == tl.n_layers and nn.d_model == tl.d_model
    inputs = tl.prepare(tiny_family.image, PROMPT)
    names = nn.hook_names()
    assert set(names) <= set(tl.hook_names())  # the adapter map is a subset of the bridge's names
    logits_tl, cache_tl = tl.run_with_cache(inputs, names_filter=names)
    logits_nn, cache_nn = nn.run_with_cache(inputs, names_filter=names)
    torch.testing.assert_close(logits_nn, logits_tl, atol=1e-5, rtol=1e-5)
    for name in names:
        torch.testing.assert_close(cache_nn[name], cache_tl[name], atol=1e-5, rtol=1e-5, msg=name)
    hooks = [("blocks.1.hook_resid_post", lambda a, hook: a * 0.5), ("blocks.2.hook_resid_pre", lambda a, hook: a + 1.0),
             ("blocks.0.hook_mlp_out", lambda a, hook: None)]  # fmt: skip
    torch.testing.assert_close(nn.run_with_hooks(inputs, fwd_hooks=hooks), tl.run_with_hooks(inputs, fwd_hooks=hooks),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    torch.testing.assert_close(nn(inputs), logits_tl, atol=1e-5, rtol=1e-5)


def test_traces_probes_patching_and_skipping_are_equal(tiny_family):
    tl, nn = tiny_family.model, nnsight_twin(tiny_family.family)
    inputs = tl.prepare(tiny_family.image, PROMPT)
    trace_tl, trace_nn = tl.trace_generation(inputs, max_new_tokens=5), nn.trace_generation(inputs, max_new_tokens=5)
    assert trace_nn.generated_ids.tolist() == trace_tl.generated_ids.tolist() and bool(trace_nn.lens_agrees.all())
    assert trace_nn.capture == "generate" and nn.capture.generator is not None  # recorded by nnsight's generation tracing
    torch.testing.assert_close(trace_nn.step_logits, trace_tl.step_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(trace_nn.cache.resid_stack(), trace_tl.cache.resid_stack(), atol=1e-5, rtol=1e-5)
    lens_tl, lens_nn = LogitLensProbe(positions="all")(trace_tl), LogitLensProbe(positions="all")(trace_nn)
    torch.testing.assert_close(lens_nn["prob"], lens_tl["prob"], atol=1e-5, rtol=1e-5)
    skip_tl, skip_nn = LayerSkip([1, 2])(trace_tl), LayerSkip([1, 2])(trace_nn)  # hooks during a whole generation
    assert skip_nn.provenance["generated_text"] == skip_tl.provenance["generated_text"]
    torch.testing.assert_close(skip_nn["kl"], skip_tl["kl"], atol=1e-5, rtol=1e-5)
    other = tl.prepare(testing.sample_image(5, testing.size_for(tiny_family.family).image_size), PROMPT)
    torch.testing.assert_close(patch_all_layers(nn, inputs, other), patch_all_layers(tl, inputs, other), atol=1e-5, rtol=1e-5)
    a, b = tl.tokenizer.convert_ids_to_tokens([5, 6])
    patch_tl = ActivationPatching(positions="image")(inputs, other, a, b, model=tl)
    patch_nn = ActivationPatching(positions="image")(inputs, other, a, b, model=nn)
    torch.testing.assert_close(patch_nn["effect"], patch_tl["effect"], atol=1e-4, rtol=1e-4)


def test_your_own_interventions_on_the_nnsight_object(tiny_llava):
    nn = nnsight_twin("llava")
    inputs = nn.prepare(tiny_llava.image, PROMPT)
    image = inputs.layout.image.to(nn.device)
    layer = nn.nnsight.model.language_model.layers[0]
    with torch.no_grad(), nn.nnsight.trace(**inputs.model_inputs):
        layer.output[:, image] = 0  # the token layout says which positions hold the image
        mine = nn.nnsight.output.logits.save()

    def zero_image(activation, hook):
        activation = activation.clone()
        activation[:, image] = 0
        return activation

    torch.testing.assert_close(mine, nn.run_with_hooks(inputs, [("blocks.0.hook_resid_post", zero_image)]))


def test_remote_goes_through_nnsight_and_bad_choices_name_the_fix(tiny_llava, monkeypatch):
    hf_model, processor = testing.build("llava")
    remote = load(hf_model, processor=processor, backend="nnsight", remote=True)
    seen = {}

    class Stop(Exception):
        pass

    def record(*args, **kwargs):  # nothing may reach the network here: record nnsight's arguments and stop
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(remote.nnsight, "trace", record)
    with pytest.raises(Stop):
        remote.run_with_cache(remote.prepare(tiny_llava.image, PROMPT))
    assert seen.get("remote") is True
    with pytest.raises(ValueError, match="backend='nnsight'"):
        load(hf_model, processor=processor, remote=True)
    with pytest.raises(ValueError, match="transformer_lens' or 'nnsight'"):
        load(hf_model, processor=processor, backend="pyvene")
    with pytest.raises(KeyError, match="did you mean"):
        remote.run_with_hooks(remote.prepare(tiny_llava.image, PROMPT), [("blocks.0.hook_resid_pots", lambda a, h: a)])


def test_a_raising_hook_leaves_no_intervention_behind(tiny_family):
    nn = nnsight_twin(tiny_family.family)
    inputs = nn.prepare(tiny_family.image, PROMPT)
    clean = nn(inputs)

    def attached():  # nnsight keeps hooks of its own on every module; ours must come and go
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in nn.hf_model.modules())

    before = attached()

    def broken(activation, hook):
        raise RuntimeError("a bug in my hook")

    with pytest.raises(RuntimeError, match="a bug in my hook"):
        nn.run_with_hooks(inputs, [("blocks.1.hook_resid_post", broken)])
    with pytest.raises(RuntimeError, match="a bug in my hook"):
        with nn.hooks([("blocks.1.hook_resid_pre", broken)]):
            nn.generate_ids(inputs, max_new_tokens=2)
    torch.testing.assert_close(nn(inputs), clean)  # nothing stayed attached
    assert attached() == before
