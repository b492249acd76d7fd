"""Bad input, tried as a new user and as an attacker would: every case raises a VLMLensError subclass whose message
names the fix (or, at the CLI, exits 2 with one line and no traceback); hooks are gone afterwards and the model's
logits are unchanged; nothing partial or mixed is left on disk."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny
from PIL import Image

import vlm_lens
from vlm_lens import errors as E
from vlm_lens import testing
from vlm_lens.probes import ActivationPatching, FeatureProjection, LayerSkip, LogitLensProbe, TunedLens
from vlm_lens.probes import metrics as M


@pytest.fixture(scope="module")
def t():
    return tiny("llava")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return testing.save("llava", tmp_path_factory.mktemp("tiny-llava-saved"))


def _copy(saved: Path, tmp: Path) -> Path:
    dest = tmp / "ckpt"
    shutil.copytree(saved, dest)
    return dest


def _edit_config(folder: Path, change) -> Path:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _truncate(folder: Path, keep: int) -> Path:
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:keep])
    return folder


def _no_processor(folder: Path) -> Path:
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json",
                 "chat_template.jinja", "special_tokens_map.json", "vocab.json", "merges.txt"):  # fmt: skip
        (folder / name).unlink(missing_ok=True)
    return folder


def _remote_code(folder: Path) -> Path:
    _edit_config(folder, lambda c: c.update(auto_map={"AutoConfig": "evil.EvilConfig"}))
    (folder / "evil.py").write_text("import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('x')\n")
    return folder


LOAD = [  # (id, source or folder-maker, kwargs, error, fix fragment)
    ("mistyped-embedded", "shapes-lava", {}, E.NotFoundError, "did you mean shapes-llava"),
    ("uncached-hub-id", "some-org/not-cached-model", {}, E.NotFoundError, "nothing is downloaded"),
    ("no-config", lambda f: (f / "config.json").unlink() or f, {}, E.NotFoundError, "config.json"),
    ("config-not-json", lambda f: (f / "config.json").write_text("{oops") and f, {}, E.InputError, "valid JSON"),
    ("config-no-architectures", lambda f: _edit_config(f, lambda c: c.pop("architectures")), {}, E.InputError,
     "architectures"),
    ("auto-map-code", _remote_code, {}, E.RemoteCodeError, "trust_remote_code=True"),
    ("truncated-weights", lambda f: _truncate(f, 5000), {}, E.InputError, "complete"),
    ("zero-byte-weights", lambda f: _truncate(f, 0), {}, E.InputError, "complete"),
    ("no-processor-files", _no_processor, {}, E.InputError, "processor"),
    ("half-on-cpu-as-string", "shapes-llava", {"dtype": "float16"}, E.InputError, "float32"),
    ("unknown-dtype", "shapes-llava", {"dtype": "floaty"}, E.InputError, "torch dtype"),
    ("cuda-without-cuda", "shapes-llava", {"device": "cuda"}, E.InputError, "device='cpu'"),
    ("unknown-backend", "shapes-llava", {"backend": "tf"}, E.InputError, "nnsight"),
    ("remote-without-nnsight", "shapes-llava", {"remote": True}, E.InputError, "backend='nnsight'"),
    ("not-a-model", 42, {}, E.InputTypeError, "PreTrainedModel"),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda case expects a machine without CUDA")
@pytest.mark.parametrize("case", LOAD, ids=[c[0] for c in LOAD])
def test_load(case, saved, tmp_path):
    _, source, kwargs, error, fix = case
    if callable(source):
        source = str(source(_copy(saved, tmp_path)))
    with pytest.raises(error, match=None) as raised:
        vlm_lens.load(source, **kwargs)
    assert fix in str(raised.value)
    assert not list(tmp_path.rglob("RAN"))  # the checkpoint's own code never ran


def test_load_in_memory_without_processor(t):
    model, _ = testing.build("llava")
    with pytest.raises(E.InputError, match="needs its processor"):
        vlm_lens.load(model)


def _prompt_cases(t):
    big = "red " * 400
    return [
        ("empty-prompt", lambda: t.model.prepare(t.image, ""), E.InputError, "question"),
        ("blank-prompt", lambda: t.model.prepare(t.image, "   "), E.InputError, "question"),
        ("missing-image", lambda: t.model.prepare("/nope/x.png", "what ?"), E.NotFoundError, "image not found"),
        ("image-wrong-type", lambda: t.model.prepare(42, "what ?"), E.InputTypeError, "PIL images or paths"),
        ("placeholders-vs-images", lambda: t.model.prepare([t.image, t.image], "<image> what ?"), E.InputError,
         "one image per placeholder"),
        ("batch-images-vs-prompts", lambda: t.model.prepare([t.image] * 3, ["a", "b"]), E.InputError, "one entry per prompt"),
        ("empty-prompt-list", lambda: t.model.prepare(t.image, []), E.InputError, "one question per sample"),
        ("prompt-past-position-limit", lambda: t.model.prepare(t.image, big), E.PositionLimitError, "shorten"),
    ]


PREPARE_IDS = ["empty-prompt", "blank-prompt", "missing-image", "image-wrong-type", "placeholders-vs-images",
               "batch-images-vs-prompts", "empty-prompt-list", "prompt-past-position-limit"]  # fmt: skip


@pytest.mark.parametrize("name", PREPARE_IDS)
def test_prepare(name, t):
    _, fn, error, fix = next(c for c in _prompt_cases(t) if c[0] == name)
    with pytest.raises(error) as raised:
        fn()
    assert fix in str(raised.value)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_prepare_unreadable_image(content, t, tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(E.InputError, match="PNG/JPEG"):
        t.model.prepare(path, "what ?")


def test_prepare_decompression_bomb(t, tmp_path, monkeypatch):
    Image.new("RGB", (400, 400)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images over 2x this many pixels
    with pytest.raises(E.InputError, match="PNG/JPEG"):
        t.model.prepare(tmp_path / "big.png", "what ?")


def _bad_hooks(t):
    d = t.model.d_model
    return [
        ("shorter-sequence", "blocks.0.hook_resid_post", lambda a, hook: a[:, :-1]),
        ("bigger-batch", "blocks.0.hook_resid_post", lambda a, hook: torch.cat([a, a])),
        ("wider", "blocks.1.hook_resid_post", lambda a, hook: torch.cat([a, a], -1)),
        ("not-a-tensor", "blocks.0.hook_resid_post", lambda a, hook: 3),
        ("final-norm-wrong-shape", "ln_final.hook_normalized", lambda a, hook: a[..., : d // 2]),
        ("embed-wrong-shape", "blocks.0.hook_resid_pre", lambda a, hook: a[:, :1]),
    ]


HOOK_IDS = ["shorter-sequence", "bigger-batch", "wider", "not-a-tensor", "final-norm-wrong-shape", "embed-wrong-shape"]


def _hooks_attached(model) -> int:
    return sum(len(p._forward_hooks) + len(p._forward_pre_hooks) for p in model.bridge.hook_dict.values())


@pytest.mark.parametrize("name", HOOK_IDS)
def test_hook_output_shape(name, t):
    model = t.model
    inputs = model.prepare(t.image, "what is this ?")
    before = model(inputs)
    attached = _hooks_attached(model)
    _, point, fn = next(c for c in _bad_hooks(t) if c[0] == name)
    with pytest.raises(E.ShapeError, match="same shape"):
        model.run_with_hooks(inputs, [(point, fn)])
    assert _hooks_attached(model) == attached  # removed although the forward raised
    assert torch.equal(model(inputs), before)  # and nothing of it stays in later runs


@pytest.mark.parametrize("name", ["unknown-hook", "unknown-cache-filter", "raising-hook", "raise-inside-hooks-block"])
def test_hook_misuse_leaves_nothing(name, t):
    model = t.model
    inputs = model.prepare(t.image, "what is this ?")
    before = model(inputs)
    attached = _hooks_attached(model)

    def boom(a, hook):
        raise RuntimeError("user hook failed")

    if name == "unknown-hook":
        with pytest.raises(E.UnknownNameError, match="did you mean"):
            model.run_with_hooks(inputs, [("blocks.0.hook_resid_pots", boom)])
    elif name == "unknown-cache-filter":
        with pytest.raises(E.UnknownNameError, match="did you mean"):
            model.run_with_cache(inputs, names_filter=["blocks.0.hook_resid_pots"])
    elif name == "raising-hook":
        with pytest.raises(RuntimeError, match="user hook failed"):
            model.run_with_hooks(inputs, [("blocks.1.hook_resid_post", boom)])
    else:
        with pytest.raises(ZeroDivisionError):
            with model.hooks([("blocks.1.hook_resid_post", lambda a, hook: a * 2)]):
                1 / 0  # noqa: B018 - the raise under test
    assert _hooks_attached(model) == attached
    assert torch.equal(model(inputs), before)


def _trace_cases(t):
    model = t.model
    x = model.prepare(t.image, "what is this ?")
    return {
        "zero-new-tokens": (lambda: model.trace_generation(x, 0), E.InputError, "max_new_tokens"),
        "batch-to-single-trace": (lambda: model.trace_generation(model.prepare(t.image, ["a", "b"])), E.InputError,
                                  "per sample"),
        "bad-capture-mode": (lambda: model.trace_generation(x, 2, capture="bogus"), E.InputError, "capture"),
        "empty-batch-trace": (lambda: model.trace_batch([]), E.InputError, "at least one sample"),
        "unembed-layer-range": (lambda: model.unembed(torch.zeros(model.d_model), layer=99), E.OutOfRangeError, "0.."),
        "patch-token-id-range": (lambda: ActivationPatching()(x, x, 10**6, 0, model=model), E.VocabularyError,
                                 "outside the vocabulary"),
        "patch-word-not-in-vocab": (lambda: ActivationPatching()(x, x, "zebraxyz", 0, model=model), E.VocabularyError,
                                    "vocabulary"),
        "multi-token-word": (lambda: model.to_single_token("red blue"), E.InputError, "single-token"),
        "skip-layer-range": (lambda: LayerSkip([99])(model.trace_generation(x, 2)), E.OutOfRangeError, "decoder layers"),
        "skip-needs-trace": (lambda: LayerSkip([0])(model.run_with_cache(x)[1]), E.InputError, "GenerationTrace"),
        "lens-variant": (lambda: LogitLensProbe(variant="bogus"), E.InputError, "variant"),
        "projection-method": (lambda: FeatureProjection(method="umap"), E.InputError, "tsne"),
        "cache-key": (lambda: model.run_with_cache(x)[1]["blocks.0.hook_nothing"], E.UnknownNameError, "names_filter"),
    }


TRACE_IDS = ["zero-new-tokens", "batch-to-single-trace", "bad-capture-mode", "empty-batch-trace", "unembed-layer-range",
             "patch-token-id-range", "patch-word-not-in-vocab", "multi-token-word", "skip-layer-range",
             "skip-needs-trace", "lens-variant", "projection-method", "cache-key"]  # fmt: skip


@pytest.mark.parametrize("name", TRACE_IDS)
def test_traces_and_probes(name, t):
    fn, error, fix = _trace_cases(t)[name]
    with pytest.raises(error) as raised:
        fn()
    assert fix in str(raised.value)


def test_generation_past_the_position_limit_warns(t):
    x = t.model.prepare(t.image, "what is this ?")
    with pytest.warns(UserWarning, match="lower max_new_tokens"):
        t.model.generate_ids(x, max_new_tokens=10_000)


def _lens_folder(tmp_path: Path, model, change=None) -> Path:
    lens = TunedLens(model.n_layers, model.d_model, model.d_vocab, model.name)
    folder = lens.save(tmp_path / "lens")
    if change is not None:
        change(folder)
    return folder


def _set_tensors(folder: Path, **tensors) -> None:
    from safetensors.torch import load_file, save_file

    current = load_file(str(folder / "lens.safetensors"))
    current.update(tensors)
    save_file(current, str(folder / "lens.safetensors"))


def _lens_cases(model):
    n, d = model.n_layers, model.d_model
    return {
        "no-lens-json": (lambda f: (f / "lens.json").unlink(), E.NotFoundError, "lens.json missing"),
        "lens-json-garbage": (lambda f: (f / "lens.json").write_text("[1, 2"), E.LensFileError, "tune-lens"),
        "lens-json-missing-key": (lambda f: (f / "lens.json").write_text('{"n_layers": 2}'), E.LensFileError, "d_model"),
        "lens-json-says-8-layers": (lambda f: (f / "lens.json").write_text(json.dumps(
            {"n_layers": 8, "d_model": d, "d_vocab": model.d_vocab})), E.LensFileError, "different lenses"),
        "nan-weights": (lambda f: _set_tensors(f, weight=torch.full((n, d, d), float("nan"))), E.LensFileError, "NaN"),
        "inf-bias": (lambda f: _set_tensors(f, bias=torch.full((n, d), float("inf"))), E.LensFileError, "NaN or inf"),
        "one-layer-weight": (lambda f: _set_tensors(f, weight=torch.zeros(1, d, d)), E.LensFileError, "different lenses"),
        "truncated-tensors": (lambda f: (f / "lens.safetensors").write_bytes(b"\x00" * 10), E.LensFileError, "retrain"),
        "lens-json-claims-huge-shapes": (lambda f: (f / "lens.json").write_text(json.dumps(
            {"n_layers": 10**6, "d_model": 10**5, "d_vocab": 10**6})), E.LensFileError, "different lenses"),
    }


LENS_IDS = ["no-lens-json", "lens-json-garbage", "lens-json-missing-key", "lens-json-says-8-layers", "nan-weights",
            "inf-bias", "one-layer-weight", "truncated-tensors", "lens-json-claims-huge-shapes"]  # fmt: skip


@pytest.mark.parametrize("name", LENS_IDS)
def test_tuned_lens_files(name, t, tmp_path):
    change, error, fix = _lens_cases(t.model)[name]
    folder = _lens_folder(tmp_path, t.model, change)
    with pytest.raises(error) as raised:
        TunedLens.load(folder, t.model)
    assert fix in str(raised.value)


def test_tuned_lens_for_another_model_and_nan_lr(t, tmp_path):
    other = TunedLens(t.model.n_layers + 1, t.model.d_model, t.model.d_vocab, "other")
    with pytest.raises(E.InputError, match="trained for a model"):
        TunedLens.load(other.save(tmp_path / "other"), t.model)
    lens = TunedLens(t.model.n_layers, t.model.d_model, t.model.d_vocab)
    for lr in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(E.InputError, match="finite positive"):
            lens.fit(t.model, [], lr=lr)


MASKED = torch.tensor([[1.0, 2.0, float("-inf"), 0.0], [0.5, float("-inf"), float("-inf"), 3.0]], dtype=torch.float64)
OTHER = torch.tensor([[0.0, 1.0, float("-inf"), 3.0], [1.0, 0.0, float("-inf"), 2.0]], dtype=torch.float64)


def _direct_kl(p_logits, q_logits):
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    return torch.tensor([sum(pi * math.log(pi / qi) for pi, qi in zip(pr.tolist(), qr.tolist()) if pi > 0)
                         for pr, qr in zip(p, q)], dtype=torch.float64)  # fmt: skip


def test_masked_vocabulary_metrics_are_finite_and_exact():
    kl = M.kl_divergence(MASKED, OTHER)
    assert torch.isfinite(M.entropy(MASKED)).all() and torch.isfinite(M.js_divergence(MASKED, OTHER)).all()
    p = MASKED.softmax(-1)
    direct_h = -torch.tensor([sum(x * math.log(x) for x in row.tolist() if x > 0) for row in p], dtype=torch.float64)
    torch.testing.assert_close(M.entropy(MASKED), direct_h)
    torch.testing.assert_close(kl, _direct_kl(MASKED, OTHER))  # masked tokens of P contribute 0 (0 log 0 = 0)
    assert torch.isinf(M.kl_divergence(OTHER, MASKED)[1])  # P gives mass to a token Q masks: infinite, not NaN
    assert float(M.js_divergence(MASKED, OTHER).max()) <= math.log(2) + 1e-12
    assert not torch.isnan(M.js_divergence(MASKED, OTHER, variant="paper")).any()


@pytest.mark.parametrize("name", ["kl-nan", "js-nan", "entropy-nan", "kl-posinf", "js-variant", "scale-rows"])
def test_metrics_refuse_what_has_no_distribution(name):
    nan = torch.tensor([1.0, float("nan"), 0.0])
    fine = torch.tensor([1.0, 2.0, 0.0])
    cases = {
        "kl-nan": (lambda: M.kl_divergence(nan, fine), "NaN"),
        "js-nan": (lambda: M.js_divergence(fine, nan), "NaN"),
        "entropy-nan": (lambda: M.entropy(nan), "NaN"),
        "kl-posinf": (lambda: M.kl_divergence(torch.tensor([1.0, float("inf")]), torch.tensor([1.0, 2.0])), "+inf"),
        "js-variant": (lambda: M.js_divergence(fine, fine, variant="reverse"), "variant"),
        "scale-rows": (lambda: M.column_max_abs_scale(torch.ones(2, 2), rows=0), "at least 1"),
    }
    fn, fix = cases[name]
    with pytest.raises(E.InputError, match=fix.replace("+", r"\+")):
        fn()


def test_nan_in_the_residual_stream_is_refused_by_the_lens(t):
    model = t.model
    x = model.prepare(t.image, "what is this ?")
    with model.hooks([("blocks.1.hook_resid_post", lambda a, hook: torch.full_like(a, float("nan")))]):
        _, cache = model.run_with_cache(x, names_filter=model.resid_names)
    with pytest.raises(E.InputError, match="NaN logits"):
        LogitLensProbe(positions="all")(cache)


def test_processor_of_another_checkpoint_is_refused_at_load():
    model, _ = testing.build("llava")
    _, other = testing.build("qwen2.5-vl")
    with pytest.raises(E.InputError, match="belongs to another checkpoint"):
        vlm_lens.load(model, processor=other)


def test_plain_question_without_a_chat_template(t, monkeypatch):
    monkeypatch.setattr(t.model.processor, "chat_template", None)
    with pytest.raises(E.InputError, match="pre-templated prompt"):
        t.model.prepare(t.image, "what is this ?")


def test_round_three_messages_name_the_fix(t, saved, tmp_path):
    """Each of these failed deep inside a library with its own words (IndexError, TypeError, KeyError ...)."""
    inputs = t.model.prepare(t.image, "what color is the star ?")
    with pytest.raises(E.InputError, match="is a folder: pass an image file"):
        t.model.prepare(str(tmp_path), "what color is the star ?")
    qwen = tiny("qwen2-vl")
    with pytest.raises(E.InputError, match="prepared by a qwen2-vl model .* not by this llava model"):
        t.model.run_with_hooks(qwen.model.prepare(qwen.image, "what color is the star ?"))
    foreign = vlm_lens.inputs.VLMInputs({**inputs.model_inputs, "input_ids": inputs.input_ids.clone().fill_(10_000)},
                                        inputs.layout, inputs.prompt, inputs.n_images)  # fmt: skip
    with pytest.raises(E.VocabularyError, match="outside this model's vocabulary"):
        t.model.run_with_hooks(foreign)
    with pytest.raises(E.InputTypeError, match=r"must take two arguments, fn\(activation, hook\)"):
        t.model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.hook_resid_post", lambda a: a)])
    with pytest.raises(E.InputTypeError, match=r"wrap it in a list"):
        t.model.run_with_hooks(inputs, fwd_hooks=("blocks.0.hook_resid_post", lambda a, h: a))
    with pytest.raises(E.InputTypeError, match="max_new_tokens must be an int"):
        t.model.trace_generation(inputs, max_new_tokens="5")
    source = t.model.prepare(t.image, "what color is the circle ?")
    n = inputs.layout.n_positions
    with pytest.raises(E.OutOfRangeError, match=rf"outside the sequence of {n} positions"):
        ActivationPatching(positions=[999])(inputs, source, 1, 2, model=t.model)
    result = LogitLensProbe()(t.model.trace_generation(inputs, max_new_tokens=2))
    with pytest.raises(E.UnknownNameError, match=r"has no 'imag'; it has \["):
        result.by_role("imag")
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").write_text(json.dumps({**config, "processor_class": "NopeProcessor"}))
    with pytest.raises(E.InputError, match="processor_config.json names processor_class .NopeProcessor., which this transformers does not know"):
        vlm_lens.load(str(folder))
