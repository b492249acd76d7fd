"""TransformerLens habits that hold: the names a TransformerLens user types, on both backends where they apply."""

import pytest
import torch

from vlm_lens.errors import InputError

PROMPT = "what color is the star ?"


def test_a_hook_registered_by_an_alias_sees_that_name(tiny_llava):
    """``blocks.0.hook_mlp_out`` is the bridge's ``blocks.0.mlp.hook_out``: inside the hook, ``hook.name`` is the name
    the hook was registered under, so a name check there matches (it silently never did)."""
    model = tiny_llava.model
    inputs = model.prepare(tiny_llava.image, PROMPT)
    seen = []
    model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.hook_mlp_out", lambda a, hook: seen.append(hook.name)),
                                            ("blocks.0.mlp.hook_out", lambda a, hook: seen.append(hook.name))])  # fmt: skip
    assert sorted(seen) == ["blocks.0.hook_mlp_out", "blocks.0.mlp.hook_out"]


def test_generate_blocks_hook_dict_and_return_type(tiny_llava):
    model = tiny_llava.model
    inputs = model.prepare(tiny_llava.image, PROMPT)
    trace = model.trace_generation(inputs, max_new_tokens=4)
    assert model.generate(inputs, max_new_tokens=4) == trace.text
    assert torch.equal(model.generate(inputs, max_new_tokens=4, return_type="tokens"), trace.generated_ids)
    assert len(model.blocks) == model.n_layers and "blocks.0.hook_resid_post" in model.hook_dict
    assert model.run_with_hooks(inputs, return_type=None) is None
    assert torch.equal(model.run_with_hooks(inputs), model(inputs))
    with pytest.raises(InputError, match="return_type"):
        model.run_with_hooks(inputs, return_type="loss")


def test_stack_activation_to_and_accumulated_resid_with_mid(tiny_llava):
    model = tiny_llava.model
    inputs = model.prepare(tiny_llava.image, PROMPT)
    names = model.resid_names + [f"blocks.{i}.hook_resid_mid" for i in range(model.n_layers)]
    _, cache = model.run_with_cache(inputs, names_filter=names)
    stacked = cache.stack_activation("resid_post")
    assert stacked.shape == (model.n_layers, 1, inputs.layout.n_positions, model.d_model)
    assert torch.equal(stacked[2], cache["blocks.2.hook_resid_post"])
    assert cache.stack_activation("resid_post", layer=2).shape[0] == 2
    resid, labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert labels[:4] == ["0", "0_mid", "1", "1_mid"] and labels[-1] == str(model.n_layers)
    assert torch.equal(resid[1], cache["blocks.0.hook_resid_mid"]) and resid.shape[0] == 2 * model.n_layers + 1
    assert cache.to("cpu") is cache


def test_on_nnsight_the_same_names_reach_the_hf_modules(tiny_llava):
    from conftest import nnsight_twin

    nn = nnsight_twin("llava")
    inputs = nn.prepare(tiny_llava.image, PROMPT)
    assert len(nn.blocks) == nn.n_layers and nn.hook_dict["blocks.0.hook_resid_post"] is nn.blocks[0]
    assert nn.run_with_hooks(inputs, return_type=None) is None
    assert nn.generate(inputs, max_new_tokens=3) == nn.trace_generation(inputs, max_new_tokens=3).text
