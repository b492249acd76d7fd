"""Every family end to end: hooks removed after a raise on the bridge, fine token roles that agree with the layout,
and the knowledge-evolution analysis with its report on both backends (exactness lives in test_hooked,
test_backends, test_batch_trace, ...: this file covers what a family adds around it)."""

import json
import re

import pytest
import torch
from conftest import nnsight_twin

from vlm_lens import roles, testing
from vlm_lens.experiments.analysis import knowledge_evolution as ke
from vlm_lens.experiments.pipeline import analyze

PROMPT = "what color is the star ?"


def test_bridge_hooks_are_removed_when_a_hook_raises(tiny_family):
    model = tiny_family.model
    inputs = model.prepare(tiny_family.image, PROMPT)
    before = model.run_with_hooks(inputs)

    def attached():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.bridge.modules())

    n_hooks = attached()

    def explode(activation, hook):
        raise RuntimeError("hook failure")

    last = model.n_layers - 1
    with pytest.raises(RuntimeError, match="hook failure"):
        model.run_with_hooks(inputs, fwd_hooks=[(f"blocks.{last}.hook_resid_post", explode)])
    with pytest.raises(RuntimeError, match="hook failure"):
        with model.hooks([("blocks.0.hook_resid_pre", explode)]):
            model.generate_ids(inputs, max_new_tokens=2)
    assert attached() == n_hooks
    assert torch.equal(model.run_with_hooks(inputs), before)


def test_fine_roles_agree_with_the_layout(tiny_family):
    model = tiny_family.model
    inputs = model.prepare(tiny_family.image, PROMPT)
    fine = roles.position_roles(model, inputs)
    assert len(fine) == inputs.layout.n_positions
    assert [roles.is_image_role(r) for r in fine] == inputs.layout.image.tolist()
    assert set(r.split(" ")[0] for r in fine) <= {"text", "marker", *roles.IMAGE_KINDS}
    words = model.tokenizer.convert_ids_to_tokens(inputs.input_ids[0].tolist())
    assert "what" in [w for w, r in zip(words, fine) if r == "text"]  # the question is text, never a marker
    trace = model.trace_generation(inputs, max_new_tokens=2)
    after = roles.position_roles(model, trace.inputs)
    assert after.count("generated") == int(trace.inputs.layout.generated.sum())


def test_roles_summary_runs():
    assert roles.summarize(["text", "text", "marker", "patch 0", "patch 0", "text"]) == "text x2, marker, patch 0 x2, text"
    assert roles.summarize([]) == ""


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_knowledge_evolution_analysis_and_report(tiny_family, backend, tmp_path):
    model = tiny_family.model if backend == "transformer_lens" else nnsight_twin(tiny_family.family)
    size = testing.size_for(tiny_family.family).image_size
    samples = [ke.Sample(testing.sample_image(i, size), "what color is the star ?", "red", f"s{i}") for i in range(2)]
    result = analyze(model, samples, tmp_path, config=ke.EvolutionConfig(max_new_tokens=3), tsne_iter=250, png=False)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["model"]["n_layers"] == model.n_layers and len(data["samples"]) == 2
    html = (tmp_path / "report.html").read_text()
    assert re.search(r"<html", html) and "s1" in html
    for sample in data["samples"]:
        assert sample["tokens"]["correct"], sample  # every sample has per-token key nodes
    assert result is not None


def test_a_saved_checkpoint_folder_loads_offline_and_equals_the_model(tiny_family, tmp_path):
    """``vlm_lens.load(folder)`` on a saved checkpoint of the family: its processor (the image-only class where the HF
    one demands a video processor) and its logits equal the in-memory model's."""
    import transformers

    from vlm_lens import load
    from vlm_lens.errors import InputError

    testing.save(tiny_family.family, tmp_path)
    architecture = type(tiny_family.reference).__name__
    if not hasattr(transformers, architecture):  # a plugin family's own class (the toy): refused, never loaded wrong
        with pytest.raises(InputError, match=f"names {architecture}, but transformers builds"):
            load(str(tmp_path))
        return
    loaded = load(str(tmp_path))
    assert loaded.family == tiny_family.family
    assert "video_processor" not in getattr(type(loaded.processor), "get_attributes", lambda: [])()
    ours = tiny_family.model
    torch.testing.assert_close(loaded(loaded.prepare(tiny_family.image, PROMPT)), ours(ours.prepare(tiny_family.image, PROMPT)),
                               rtol=0, atol=0)  # fmt: skip


def test_the_report_maps_the_answer_on_the_grid_that_covers_the_whole_image(tiny_family):
    """The report's patch map (the first answer token's lens probability over the image) uses the grid whose geometry
    is the whole image: the only grid, or a tiling family's thumbnail; Mllama has no image positions: no map."""
    from vlm_lens.experiments.runs.reduce import patch_map
    from vlm_lens.probes import ImagePatchLens

    model = tiny_family.model
    trace = model.trace_generation(model.prepare(tiny_family.image, PROMPT), max_new_tokens=1)
    found = patch_map(trace)
    if not model.adapter.image_positions:
        assert found is None
        return
    kinds = {r.split(" ")[0] for r in roles.position_roles(model, trace.inputs) if roles.is_image_role(r)}
    result = ImagePatchLens([int(trace.generated_ids[0])])(trace)
    index = result.provenance["grid_roles"].index("thumbnail 0" if "thumbnail" in kinds else "patch 0")
    rows, cols = result.provenance["grids"][index]
    assert found["grid"] == [rows, cols]
    assert torch.equal(torch.tensor(found["prob"]), result["prob"][:, index, :rows, :cols, 0].float())


def test_blocking_chosen_heads_during_generation_runs_and_leaves_nothing(tiny_family):
    """Heads chosen in ``block_attention`` while generating past a sliding window (Gemma 3's cache keeps only the last
    keys: the blocked-edge mask must follow its columns) and on every other family; removed afterwards."""
    model = tiny_family.model
    inputs = model.prepare(tiny_family.image, PROMPT)
    before = model(inputs)
    with model.block_attention("generated", "text", layers=[0], heads=[0]):
        ids = model.generate_ids(inputs, 6, stop_at_eos=False)
    assert len(ids) == 6
    assert torch.equal(model(inputs), before)
