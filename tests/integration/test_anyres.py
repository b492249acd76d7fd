"""Anyres tiling (LLaVA-NeXT, LLaVA-OneVision): the adapter's token layout (thumbnail, tile rows, newlines) agrees
with what the HF forward merges for every tiling the processor can produce, and samples whose images need different
numbers of tiles batch exactly."""

import pytest
import torch
from conftest import tiny

from vlm_lens import roles, testing
from vlm_lens.adapters.llava_next import anyres_grids, anyres_parts

ANYRES = ["llava-next", "llava-onevision"]
PROMPT = "what color is the star ?"


def images():
    """A square image (2 x 2 tiles), a small one (1 tile) and a wide one (2 x 2 canvas, padding rows cut)."""
    return [testing.sample_image(1, 32), testing.sample_image(2, 16), testing.sample_image(3, 32).resize((48, 24))]


def merged(model, model_inputs) -> int:
    """How many image features the HF forward merges (one per placeholder, or it raises)."""
    with torch.no_grad():
        out = model.hf_model(**model_inputs, output_hidden_states=False)
    assert out.image_hidden_states is not None
    return int(out.image_hidden_states.shape[0])


@pytest.mark.parametrize("family", ANYRES)
def test_roles_and_grids_follow_the_tiling(family):
    model = tiny(family).model
    for image in images():
        inputs = model.prepare(image, PROMPT)
        fine = roles.position_roles(model, inputs)
        thumb, tiles = model.image_grids(inputs)
        assert merged(model, inputs.model_inputs) == thumb[0] * thumb[1] + tiles[0] * tiles[1]
        assert fine.count("thumbnail 0") == thumb[0] * thumb[1] and fine.count("newline 0") == tiles[0]
        assert fine.count("patch 0") == tiles[0] * (tiles[1] - 1)
        image_roles = [r for r in fine if roles.is_image_role(r)]
        assert image_roles[-1] == "newline 0" and image_roles[: thumb[0] * thumb[1]] == ["thumbnail 0"] * thumb[0] ** 2
    assert roles.summarize(fine).startswith("text x2, thumbnail 0 x4, patch 0 x4, newline 0, patch 0 x4, newline 0")


@pytest.mark.parametrize("family", ANYRES)
def test_images_with_different_tilings_batch_exactly(family):
    model = tiny(family).model
    batch = model.prepare([*images()[:2], images()], [PROMPT, "what shape is it ?", PROMPT])
    assert len({s.model_inputs["pixel_values"].shape[1] for s in batch.samples}) == 2  # 5 views and 2 views
    with torch.no_grad():
        logits = model(batch)
        for i, sample in enumerate(batch.samples):
            n = sample.input_ids.shape[1]
            assert (logits[i, :n] - model(sample)[0]).abs().max() <= 1e-5
    traces = model.trace_batch(batch, 3)
    assert [t.generated_ids.tolist() for t in traces] == [model.trace_generation(s, max_new_tokens=3).generated_ids.tolist()
                                                          for s in batch.samples]  # fmt: skip


def test_onevision_several_images_of_one_sample_are_untiled():
    model = tiny("llava-onevision").model
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": PROMPT}]
    text = model.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=False)  # fmt: skip
    encoded = model.processor(images=[images()[::2]], text=[text], return_tensors="pt")  # nested: one sample, 2 images
    assert encoded["batch_num_images"].tolist() == [2]
    n = int((encoded["input_ids"] == model.image_token_id).sum())
    assert merged(model, dict(encoded)) == n
    assert anyres_grids(model.hf_model.config, encoded, n) == [(2, 2), (1, 1), (2, 2), (1, 1)]
    parts = anyres_parts(model.hf_model.config, encoded, n)
    assert parts == [("patch", 0)] * 4 + [("newline", 0)] + [("patch", 1)] * 4 + [("newline", 1)]


def test_onevision_downscales_large_tile_grids(monkeypatch):
    model = tiny("llava-onevision").model
    # anyres_max_1: a 2 x 2-tile grid (4 x 4 patches) is over one tile's worth of features, so it is downscaled 2 x 2
    monkeypatch.setattr(model.hf_model.config, "vision_aspect_ratio", "anyres_max_1")
    monkeypatch.setattr(model.processor, "vision_aspect_ratio", "anyres_max_1")
    inputs = model.prepare(images()[0], PROMPT)
    assert model.image_grids(inputs) == [(2, 2), (2, 3)]
    assert merged(model, inputs.model_inputs) == int(inputs.layout.image.sum()) == 10
