"""Session-scoped tiny models of every family, shared by the whole suite (building one takes ~1 s)."""

from __future__ import annotations

import importlib.util
import os

import pytest

from vlm_lens import adapters

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one torch thread per worker, not two workers x two threads
    import torch

    torch.set_num_threads(1)

# Extra adapter files (os.pathsep-separated) to register before the family matrix is drawn: how a new family is
# tried before it joins vlm_lens/adapters/ (tests/integration/test_new_family.py runs the matrix on a throw-away one).
for _path in filter(None, os.environ.get("VLM_LENS_TEST_ADAPTERS", "").split(os.pathsep)):
    _spec = importlib.util.spec_from_file_location(f"vlm_lens_test_adapter_{abs(hash(_path))}", _path)
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    adapters.register(_module.ADAPTER)
FAMILIES = tuple(adapters.families(buildable=True))  # every family with a small random model, from the registry


class TinyFamily:
    """A hooked tiny model, an untouched twin with identical weights (the plain HF reference), and an image."""

    def __init__(self, family: str):
        from vlm_lens import load, testing

        self.family = family
        hf_model, processor = testing.build(family)
        self.reference, _ = testing.build(family)  # same seed -> same weights; never wrapped by the bridge
        self.reference.set_attn_implementation("eager")  # the bridge forces eager: compare like with like
        self.processor = processor
        self.model = load(hf_model, processor=processor)
        self.image = testing.sample_image(1, testing.size_for(family).image_size)


_NN: dict = {}


def nnsight_twin(family: str):
    """The nnsight backend over a fresh build of the same tiny weights (eager attention, as the bridge forces),
    shared by the suite."""
    from vlm_lens import load, testing

    if family not in _NN:
        hf_model, processor = testing.build(family)
        hf_model.set_attn_implementation("eager")
        _NN[family] = load(hf_model, processor=processor, backend="nnsight")
    return _NN[family]


_CACHE: dict[str, TinyFamily] = {}


def tiny(family: str) -> TinyFamily:
    if family not in _CACHE:
        _CACHE[family] = TinyFamily(family)
    return _CACHE[family]


@pytest.fixture(params=FAMILIES, scope="session")
def tiny_family(request) -> TinyFamily:
    return tiny(request.param)


@pytest.fixture(scope="session")
def tiny_llava() -> TinyFamily:
    return tiny("llava")


@pytest.fixture(scope="session")
def tiny_qwen25() -> TinyFamily:
    return tiny("qwen2.5-vl")


_EMBEDDED: dict = {}


def embedded(name: str):
    """One loaded copy of each embedded model for the whole session (tests import it: ``from conftest import ...``)."""
    if name not in _EMBEDDED:
        from vlm_lens import load

        _EMBEDDED[name] = load(name)
    return _EMBEDDED[name]
