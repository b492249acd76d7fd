"""Loading is offline and validated: folders, in-memory models, clear errors; no subprocess, no socket."""

import socket
import subprocess

import pytest
import torch

import vlm_lens
from vlm_lens import testing

PROMPT = "what shape is the red one ?"


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    return testing.save("llava", tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def saved_qwen(tmp_path_factory):
    return testing.save("qwen2-vl", tmp_path_factory.mktemp("tiny-qwen2-vl"))


def test_load_from_folder_equals_in_memory(saved_llava, tiny_llava):
    model = vlm_lens.load(saved_llava)
    assert model.family == "llava" and model.n_layers == testing.TINY.n_layers
    image = tiny_llava.image
    a, _ = model.run_with_cache(model.prepare(image, PROMPT), names_filter=[])
    b, _ = tiny_llava.model.run_with_cache(tiny_llava.model.prepare(image, PROMPT), names_filter=[])
    assert (a - b).abs().max() <= 1e-6


def test_load_qwen_folder_without_video_processor(saved_qwen):
    model = vlm_lens.load(str(saved_qwen))
    inputs = model.prepare(testing.sample_image(2, 32), PROMPT)
    assert model.family == "qwen2-vl" and "image_grid_thw" in inputs.model_inputs


def test_no_subprocess_and_no_socket(saved_llava, monkeypatch):
    calls = []

    def refuse(kind):
        def _refuse(*args, **kwargs):
            calls.append((kind, args))
            raise AssertionError(f"vlm-lens tried to use {kind}: {args!r}")

        return _refuse

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("a subprocess"))
    monkeypatch.setattr(socket.socket, "connect", refuse("a socket"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("a socket"))
    monkeypatch.setattr(socket, "create_connection", refuse("a socket"))
    model = vlm_lens.load(saved_llava)
    inputs = model.prepare(testing.sample_image(3, 32), PROMPT)
    model.run_with_cache(inputs)
    trace = model.trace_generation(inputs, max_new_tokens=4)
    assert trace.n_steps >= 1
    assert calls == []


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny_llm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    _, processor = testing.build("llava")
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration.*Qwen2VLForConditionalGeneration"):
        vlm_lens.load(tiny_llm, processor=processor)


def test_bad_sources_and_dtypes(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        vlm_lens.load("no-such-org/no-such-model")
    with pytest.raises(FileNotFoundError, match="config.json"):
        vlm_lens.load(tmp_path)
    with pytest.raises(ValueError, match="float32"):
        vlm_lens.load("anything", dtype=torch.float16)
    model, _ = testing.build("llava")
    with pytest.raises(ValueError, match="processor"):
        vlm_lens.load(model)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        vlm_lens.load(42)


def test_prepare_validates_its_inputs(tiny_llava, tmp_path):
    model = tiny_llava.model
    image = tiny_llava.image
    with pytest.raises(ValueError, match="prompt is empty"):
        model.prepare(image, "  ")
    with pytest.raises(ValueError, match="2 image"):
        model.prepare([image, image], "user : <image> what ? assistant :")
    with pytest.raises(FileNotFoundError, match="image not found"):
        model.prepare(tmp_path / "missing.png", PROMPT)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        model.prepare(broken, PROMPT)
    with pytest.raises(TypeError, match="PIL images or paths"):
        model.prepare([3], PROMPT)
    path = tmp_path / "ok.png"
    image.save(path)
    assert torch.equal(model.prepare(path, PROMPT).input_ids, model.prepare(image, PROMPT).input_ids)


def test_bad_names_layers_and_inputs(tiny_llava):
    model = tiny_llava.model
    inputs = model.prepare(tiny_llava.image, PROMPT)
    with pytest.raises(KeyError, match="did you mean blocks.1.hook_resid_post"):
        model.run_with_hooks(inputs, fwd_hooks=[("blocks.1.hook_resid_psot", lambda a, hook: a)])
    with pytest.raises(KeyError, match="unknown hook name"):
        model.run_with_cache(inputs, names_filter=["nope"])
    with pytest.raises(IndexError, match="0..4"):
        model.unembed(torch.zeros(model.d_model), layer=9)
    with pytest.raises(TypeError, match="prepare"):
        model.run_with_cache({"input_ids": inputs.input_ids})
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.trace_generation(inputs, max_new_tokens=0)
    _, cache = model.run_with_cache(inputs, names_filter=["blocks.0.hook_resid_post"])
    with pytest.raises(KeyError, match="names_filter"):
        cache.resid_stack()
    with pytest.raises(KeyError, match="names_filter"):
        cache["blocks.3.hook_mlp_out"]


def test_hook_names_cover_the_documented_points(tiny_family):
    names = set(tiny_family.model.hook_names())
    for name in ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post",
                 "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out", "ln_final.hook_normalized",
                 "vision_projector.hook_out", "unembed.hook_out"):
        assert name in names, name


def test_demo_runs_on_the_tiny_model(capsys):
    from vlm_lens import demo

    demo.run("tiny-llava", max_new_tokens=3)
    out = capsys.readouterr().out
    assert "lens reproduces every token: True" in out and "0 = embeddings" in out


def test_an_in_memory_processor_is_kept_even_when_it_cannot_round_trip():
    """Qwen processors subclassed in a notebook cannot be saved and reloaded by class name; load() keeps them."""
    import torch

    from vlm_lens import load, testing

    model, processor = testing.build("qwen2.5-vl")
    reference, _ = testing.build("qwen2.5-vl")
    reference.set_attn_implementation("eager")
    processor.__class__ = type("NotebookProcessor", (type(processor),), {})  # unknown to AutoProcessor
    processor.tokenizer.name_or_path = ""  # in memory: TransformerLens needs a folder for it
    hooked = load(model, processor=processor)
    assert hooked.processor is processor
    inputs = hooked.prepare(testing.sample_image(1, testing.size_for("qwen2.5-vl").image_size), "what color ?")
    with torch.no_grad():
        expected = reference(**inputs.model_inputs).logits
    torch.testing.assert_close(hooked(inputs), expected, atol=1e-5, rtol=1e-5)


def test_a_tokenizer_that_cannot_round_trip_gets_a_clear_error(monkeypatch):
    import pytest

    from vlm_lens import load, testing

    model, processor = testing.build("llava")
    processor.tokenizer.name_or_path = ""

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(processor.tokenizer), "save_pretrained", broken)
    with pytest.raises(ValueError, match="does not survive save_pretrained"):
        load(model, processor=processor)
