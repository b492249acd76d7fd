"""Offline tokenizers and processors for models built from configs.

No model hub is reachable on the machines this project targets, so the tiny test models and the embedded
shapes-world models carry processors built here: a word-level tokenizer (``tokenizers`` WordLevel, lower-cased,
whitespace split), wrapped in ``PreTrainedTokenizerFast``, plus the real HF image processors (PIL backends, since
torchvision is absent) and the real HF multimodal processors.

Two traps handled here (see shared docs, environment.md):
- ``Qwen2VLProcessor`` derives its attributes from its ``__init__`` signature and demands a video processor, which
  needs torchvision. :class:`Qwen2VLImageOnlyProcessor` drops that parameter; it saves, reloads, and feeds the
  Qwen2-VL and Qwen2.5-VL families.
- TransformerLens cannot boot on an in-memory tokenizer (``KeyError: 'name_or_path'``): processors built here are
  saved to a folder and reloaded from it before use (:func:`save_and_reload`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence
from vlm_lens.errors import InputError

LLAVA_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
QWEN_SPECIAL_TOKENS = LLAVA_SPECIAL_TOKENS + (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

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
LLAVA_IMAGE_PLACEHOLDER = "<image>"
QWEN_IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
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


def build_word_tokenizer(words: Iterable[str], special_tokens: Sequence[str] = LLAVA_SPECIAL_TOKENS):
    """A lower-cased WordLevel tokenizer (whitespace split, punctuation isolated) over ``special_tokens + sorted(set(words | CHAT_WORDS))``.

    Ids are deterministic: specials first in the given order, then the words sorted. ``<pad>`` is id 0. The chat
    template's own words (``user``, ``assistant``, ``:``) are always included.
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
    )
    tokenizer.padding_side = "right"
    return tokenizer


def build_llava_processor(tokenizer, *, image_size: int, patch_size: int):
    """A ``LlavaProcessor`` for a CLIP tower of ``image_size``/``patch_size`` (CLS dropped: "default" strategy)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    tokenizer.chat_template = chat_template(LLAVA_IMAGE_PLACEHOLDER)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def _qwen_processor_class():
    from transformers import Qwen2VLProcessor

    class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
        """``Qwen2VLProcessor`` without a video processor (which would need torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(
                image_processor=image_processor,
                tokenizer=tokenizer,
                video_processor=None,
                chat_template=chat_template,
                **kwargs,
            )

    return Qwen2VLImageOnlyProcessor


def qwen_image_only_processor_class():
    """The image-only Qwen2-VL processor class (built lazily: importing transformers is slow)."""
    global _QWEN_CLASS
    if _QWEN_CLASS is None:
        _QWEN_CLASS = _qwen_processor_class()
    return _QWEN_CLASS


_QWEN_CLASS = None


def build_qwen2_vl_processor(
    tokenizer, *, image_size: int, patch_size: int, merge_size: int = 2, temporal_patch_size: int = 2
):
    """An image-only Qwen2-VL processor whose image processor keeps ``image_size``² images unresized.

    ``image_size`` must be a multiple of ``patch_size * merge_size``; the image then yields
    ``(image_size / patch_size / merge_size)²`` language-model tokens.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    factor = patch_size * merge_size
    if image_size % factor:
        raise InputError(f"image_size {image_size} must be a multiple of patch_size*merge_size = {factor}")
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=pixels,
        max_pixels=pixels,
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
    )
    tokenizer.chat_template = chat_template(QWEN_IMAGE_PLACEHOLDER)
    cls = qwen_image_only_processor_class()
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def save_and_reload(processor, folder: str | Path):
    """Save ``processor`` to ``folder`` and load it back from there (tokenizer gets a ``name_or_path``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(folder)
    return load_processor(folder)


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


def load_processor(folder: str | Path, *, trust_remote_code: bool = False):
    """Load a processor saved by this module (or any local HF processor folder) without network access; a folder
    without processor files is refused with the fix."""
    from transformers import AutoProcessor

    folder = Path(folder)
    config_path = folder / "processor_config.json"
    processor_class = None
    if config_path.exists():
        processor_class = json.loads(config_path.read_text()).get("processor_class")
    if processor_class in ("Qwen2VLImageOnlyProcessor", "Qwen2VLProcessor", "Qwen2_5_VLProcessor") and not _has_video(
        folder
    ):
        return qwen_image_only_processor_class().from_pretrained(folder, local_files_only=True,
                                                                  trust_remote_code=trust_remote_code)  # fmt: skip
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


def _has_video(folder: Path) -> bool:
    return (folder / "video_preprocessor_config.json").exists()
