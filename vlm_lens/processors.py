"""Offline tokenizers and the generic processor loader, for every family.

No model hub is reachable on the machines this project targets, so the tiny test models and the embedded
shapes-world models carry processors built from a word-level tokenizer (``tokenizers`` WordLevel, lower-cased,
whitespace split, wrapped in ``PreTrainedTokenizerFast``) and the chat template here, plus the family's real HF
image and multimodal processors (each adapter's ``word_processor``, PIL backends since torchvision is absent).

TransformerLens cannot boot on an in-memory tokenizer (``KeyError: 'name_or_path'``): built processors are saved to
a folder and reloaded from it before use (:func:`vlm_lens.loading.save_and_reload`), and an in-memory tokenizer is
given a folder copy (:func:`tokenizer_from_folder`). Family quirks of loading (Qwen2-VL's video processor) sit in the
adapters; :func:`vlm_lens.loading.load_processor` applies them before :func:`load_auto_processor`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from vlm_lens.errors import InputError

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # every word-level vocabulary starts with these

# "user : <image> what color is the star ? assistant :" -- the image placeholder comes from the processor's
# ``image_token`` so one template serves LLaVA (<image>) and Qwen (<|vision_start|><|image_pad|><|vision_end|>).
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} :"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %} IMAGE_PLACEHOLDER"
    "{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
CHAT_WORDS = ("user", "assistant", ":")


def chat_template(image_placeholder: str) -> str:
    """The word-level chat template with the family's image placeholder."""
    return _CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", image_placeholder)


# punctuation that becomes its own token ("circle?" -> "circle ?"); hyphens stay inside words ("top-left")
WORD_PUNCTUATION = r"[?.,!;:]"


def word_pre_tokenizer():
    """Whitespace split, then punctuation isolated: ordinary questions tokenise as the training data did."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(WORD_PUNCTUATION), behavior="isolated")]
    )


def build_word_tokenizer(words: Iterable[str], special_tokens: Sequence[str] = SPECIAL_TOKENS,
                         named_tokens: Mapping[str, str] | None = None):  # fmt: skip
    """A lower-cased WordLevel tokenizer (whitespace split, punctuation isolated) over ``special_tokens + sorted(set(words | CHAT_WORDS))``.

    Ids are deterministic: specials first in the given order, then the words sorted. ``<pad>`` is id 0. The chat
    template's own words (``user``, ``assistant``, ``:``) are always included. ``named_tokens`` become tokenizer
    attributes that some processors read (InternVL's ``start_image_token``, with ``start_image_token_id``), saved
    with the tokenizer.
    """
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in list(special_tokens) + sorted({w.lower() for w in (*words, *CHAT_WORDS)}):
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = word_pre_tokenizer()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=[t for t in special_tokens if t not in ("<pad>", "<s>", "</s>", "<unk>")],
        **dict(named_tokens or {}),
    )
    tokenizer.padding_side = "right"
    return tokenizer


def tokenizer_from_folder(tokenizer, folder: str | Path):
    """A copy of an in-memory ``tokenizer`` saved to ``folder`` and loaded back (so it has a ``name_or_path``)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    try:
        tokenizer.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as error:  # any failure of the round trip gets one clear message
        raise InputError(
            f"this processor's tokenizer ({type(tokenizer).__name__}) does not survive save_pretrained -> "
            f"from_pretrained ({type(error).__name__}: {error}); save the processor to a folder and pass "
            "vlm_lens.load(model, processor=...) a processor loaded from there, or load the checkpoint folder itself"
        ) from error


def saved_processor_class(folder: str | Path) -> str | None:
    """The ``processor_class`` a saved processor folder names (None without ``processor_config.json``)."""
    config_path = Path(folder) / "processor_config.json"
    return json.loads(config_path.read_text()).get("processor_class") if config_path.exists() else None


def load_auto_processor(folder: str | Path, *, trust_remote_code: bool = False):
    """Load a local HF processor folder with ``AutoProcessor`` without network access; a folder without processor
    files, or naming a class this transformers does not know, is refused with the fix."""
    from transformers import AutoProcessor

    folder = Path(folder)
    config_path = folder / "processor_config.json"
    processor_class = saved_processor_class(folder)
    if not any((folder / f).exists() for f in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json",
                                               "tokenizer.json")):  # fmt: skip
        raise InputError(f"{folder} has no processor files (processor_config.json, tokenizer files): save the "
                         "processor beside the weights (processor.save_pretrained(folder)) or pass processor=")  # fmt: skip
    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(f"cannot load the processor in {folder} ({type(error).__name__}: {str(error)[:300]}); "
                         "re-save it with processor.save_pretrained(folder)") from error
    if processor_class and not hasattr(processor, "tokenizer"):
        # AutoProcessor falls back to the bare tokenizer when it does not know the class the config names
        raise InputError(f"{config_path} names processor_class {processor_class!r}, which this transformers does not "
                         f"know (it loaded a {type(processor).__name__} instead): fix the name in that file, upgrade "
                         "transformers, or pass processor= to vlm_lens.load")  # fmt: skip
    return processor


def image_only_loader(processor_class: Callable[[], Any]) -> Callable[[Path, bool], Any]:
    """The ``load_processor`` of a family whose HF processor demands a video processor (which needs torchvision):
    a saved folder without a video processor loads as ``processor_class()`` (the family's image-only subclass); a
    folder with one gives None, so ``AutoProcessor`` loads it as saved."""

    def load_image_only_processor(folder: Path, trust_remote_code: bool = False):
        if (Path(folder) / "video_preprocessor_config.json").exists():
            return None
        return processor_class().from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)

    return load_image_only_processor
