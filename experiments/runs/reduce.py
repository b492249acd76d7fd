"""Per-sample reduction: a traced, analysed sample -> store rows (and back to what the report draws).

What a sample keeps after its trace is released (``n`` decoder layers, ``k`` = 5, ``d`` = d_model):

- ``samples``: one row: id, dataset index, question, generated text, reference answer, correctness, generated
  tokens, hallucination-reversal curves per lens variant (JSON), a PNG thumbnail for the first samples;
- ``tokens``: one row per (lens variant, generated token): the evidence (:class:`TokenEvolution` fields) and the
  per-layer arrays ``prob`` [n+1], ``js_adjacent`` [n], ``topk_ids``/``topk_prob`` [(n+1)·k] (layer-major) and the
  candidate curves the report charts, ``curve_ids`` [c] and ``curve_prob`` [c·(n+1)];
- ``states``: the residual stack at the answer position (the last prompt position) [(n+1)·d] and its final-normed
  last layer [d] (what HF's ``hidden_states[-1]`` holds, for the paper's t-SNE);
- ``single`` (first samples only): the (layer x generated token) stack [(n+1)·steps·d] for the one-image t-SNE;
- ``skip`` (with the sweep): one row per single skipped decoder layer.

:class:`StoredSample` reads those rows back with the attributes the report uses (``tokens``, ``lens[v]["prob"]``,
``shift[v]["js_adjacent"]``, ``curves()``...), so a report is drawn the same way from 10 samples or 10,000.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from vlm_lens.experiments.analysis.knowledge_evolution import SampleEvolution, TokenEvolution
from vlm_lens.experiments.analysis.layer_skip import skip_summary
from vlm_lens.probes import LayerSkip
from vlm_lens.probes.geometry import FeatureProjection, paper_states

DETAIL_SAMPLES = 3  # samples (by dataset index) whose (layer x token) states are kept for the one-image t-SNE
THUMBNAIL_SAMPLES = 24  # samples whose input image is kept as a thumbnail for the report's cards
TOKEN_FIELDS = [f for f in TokenEvolution.__dataclass_fields__]
INT_FIELDS = {"step", "critical", "mutation", "candidate", "swap_kept", "swap_tried", "swap_held", "leader_rank", "swap_kept_before"}


def thumbnail(image, width: int = 144) -> bytes | None:
    """A PNG thumbnail (at most ``width`` px) of a path or PIL image; None when it cannot be read."""
    from PIL import Image

    try:
        picture = Image.open(image).convert("RGB") if not isinstance(image, Image.Image) else image.convert("RGB")
    except (OSError, ValueError):
        return None
    picture.thumbnail((width, width))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def patch_map(trace) -> dict | None:
    """The first generated token's probability at every image token of the first image, every stack layer, on the
    image's token grid (:class:`~vlm_lens.probes.ImagePatchLens`): what the report overlays on the input image. A
    tiling family's image has several grids: the thumbnail's is the one that covers the whole image (None without
    one: tiles alone are not the image's geometry)."""
    from vlm_lens.probes import ImagePatchLens

    if not trace.n_steps or not bool(trace.layout.image.any()):
        return None
    token = int(trace.generated_ids[0])
    result = ImagePatchLens([token])(trace)
    grid_roles = result.provenance["grid_roles"] or []
    first = [i for i, role in enumerate(grid_roles) if role.endswith(" 0")]
    whole = first if len(first) == 1 else [i for i in first if grid_roles[i] == "thumbnail 0"]
    if not whole:
        return None
    rows, cols = result.provenance["grids"][whole[0]]
    prob = result["prob"][:, whole[0], :rows, :cols, 0]  # [layer, row, col]
    return {"token": result.coords["word"][0], "step": 0, "grid": [rows, cols], "prob": prob.float().tolist()}


def sample_row(entry, evolution: SampleEvolution | None, error: str | None = None, patch_maps: int = 0) -> dict:
    """The ``samples`` row of one dataset entry (``evolution`` None and ``error`` set for a bad row); the first
    ``patch_maps`` samples (by dataset index) keep their :func:`patch_map`."""
    image = entry.image
    row = {"sample_id": entry.id, "index": entry.index, "where": entry.where, "question": entry.question,
           "answer": entry.answer, "planted": bool(entry.planted),
           "image_path": str(image) if image is not None and not hasattr(image, "size") else None,
           "thumbnail": thumbnail(image) if image is not None and entry.index < THUMBNAIL_SAMPLES and error is None else None,
           "status": "bad" if error else "ok", "error": error, "prompt": None, "generated_text": None,
           "generated_tokens": None, "correct": None, "n_steps": 0, "hallucination": None, "patch_map": None}  # fmt: skip
    if evolution is not None:
        row.update(prompt=evolution.prompt, generated_text=evolution.generated_text, correct=evolution.correct,
                   generated_tokens=list(evolution.trace.generated_tokens), n_steps=evolution.trace.n_steps,
                   hallucination=json.dumps(evolution.hallucination))  # fmt: skip
        if entry.index < patch_maps:
            found = patch_map(evolution.trace)
            row["patch_map"] = json.dumps(found) if found is not None else None
    return row


def token_rows(sample_id: str, evolution: SampleEvolution, tokenizer) -> list[dict]:
    """The ``tokens`` rows of one analysed sample: every variant, every generated token."""
    rows = []
    ids = evolution.trace.generated_ids.tolist()
    for variant, tokens in evolution.tokens.items():
        lens = evolution.lens[variant]
        js = evolution.shift[variant]["js_adjacent"]
        for t in tokens:
            curves = evolution.curves(variant, t.step, tokenizer)
            curve_ids = tokenizer.convert_tokens_to_ids(list(curves))
            rows.append({
                "sample_id": sample_id, "variant": variant, "token_id": ids[t.step], **asdict(t),
                "prob": lens["prob"][:, t.step].float().tolist(),
                "js_adjacent": js[:, t.step].float().tolist(),
                "topk_ids": lens["topk_ids"][:, t.step].reshape(-1).tolist(),
                "topk_prob": lens["topk_prob"][:, t.step].reshape(-1).float().tolist(),
                "curve_ids": list(curve_ids), "curve_prob": [p for c in curves.values() for p in c],
            })  # fmt: skip
    return rows


def state_rows(sample_id: str, trace, index: int) -> tuple[dict, dict | None]:
    """The answer-position ``states`` row, and the ``single`` row for the first samples (else None)."""
    from vlm_lens.probes.base import as_source

    source = as_source(trace)
    pos = source.positions("last_prompt")
    stack = trace.cache.resid_stack(pos)[:, 0].float().cpu()  # [n+1, d]
    normed = paper_states(trace.model, stack.unsqueeze(1))[-1, 0].float()  # [d]
    state = {"sample_id": sample_id, "answer_state": stack.reshape(-1).tolist(), "answer_state_normed": normed.tolist(),
             "d_model": stack.shape[1]}  # fmt: skip
    single = None
    if index < DETAIL_SAMPLES:
        stack_all, positions, labels = FeatureProjection().stack_of(source)  # [n+1, steps, d], correct features
        last_normed = paper_states(trace.model, stack_all)[-1]  # [steps, d]
        single = {"sample_id": sample_id, "stack": stack_all.reshape(-1).tolist(), "last_normed": last_normed.reshape(-1).tolist(),
                  "labels": labels, "n_tokens": len(labels)}  # fmt: skip
    return state, single


def sweep_rows(sample_id: str, trace, answer: str | None) -> list[dict]:
    """Skip each single decoder layer on ``trace`` (while the model is at hand): one ``skip`` row per layer."""
    return set_rows(sample_id, trace, answer, {str(layer): [layer] for layer in range(trace.model.n_layers)})


def set_rows(sample_id: str, trace, answer: str | None, sets: dict[str, list[int]]) -> list[dict]:
    """The named skip sets (skip.1/2/3, and ``none``) on ``trace``: one ``skip`` row each."""
    results = LayerSkip().run_sets(trace, sets)  # one skipper per trace: the sets share the original KV cache
    return [{"sample_id": sample_id, "set": name, **skip_summary(result, answer, trace.model)}
            for name, result in results.items()]  # fmt: skip


# -- reading back -------------------------------------------------------------------------------------------------
class Vocabulary:
    """``convert_ids_to_tokens`` / ``convert_tokens_to_ids`` from a stored id -> token list (no tokenizer needed)."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self._ids = {t: i for i, t in enumerate(tokens)}

    def convert_ids_to_tokens(self, ids):
        return self.tokens[ids] if isinstance(ids, int) else [self.tokens[i] for i in ids]

    def convert_tokens_to_ids(self, tokens):
        return self._ids[tokens] if isinstance(tokens, str) else [self._ids[t] for t in tokens]


@dataclass
class _Trace:  # what the report reads off a trace
    n_steps: int
    generated_tokens: list[str]


@dataclass
class StoredSample:
    """A sample read back from a store, with the attributes of :class:`SampleEvolution` the report uses."""

    name: str
    index: int
    question: str
    prompt: str
    generated_text: str
    answer: str | None
    correct: bool | None
    planted: bool
    image: Any
    tokens: dict[str, list[TokenEvolution]]
    trace: _Trace
    lens: dict[str, dict] = field(default_factory=dict, repr=False)
    shift: dict[str, dict] = field(default_factory=dict, repr=False)
    curve_data: dict = field(default_factory=dict, repr=False)
    hallucination: dict = field(default_factory=dict, repr=False)
    patch_map: dict | None = field(default=None, repr=False)  # reduce.patch_map, for the first samples

    def curves(self, variant: str, step: int, tokenizer) -> dict[str, list[float]]:
        ids, probs = self.curve_data[variant][step]
        n1 = len(probs) // max(1, len(ids))
        return {tokenizer.convert_ids_to_tokens(int(i)): list(probs[k * n1 : (k + 1) * n1]) for k, i in enumerate(ids)}


def stored_samples(sample_frame, token_frame, n_layers: int, top_k: int = 5, arrays: bool = True) -> list[StoredSample]:
    """:class:`StoredSample` objects from a ``samples`` frame (ok rows) and the matching ``tokens`` frame.

    ``arrays=False`` reads only the evidence and ``js_adjacent`` (what the aggregate needs)."""
    from PIL import Image

    from vlm_lens.probes.metrics import PAPER_HEATMAP_ROWS, column_max_abs_scale

    by_sample = {sid: frame for sid, frame in token_frame.groupby("sample_id", sort=False)} if len(token_frame) else {}
    out = []
    for row in sample_frame.itertuples(index=False):
        frame = by_sample.get(row.sample_id)
        tokens: dict[str, list[TokenEvolution]] = {}
        lens: dict[str, dict] = {}
        shift: dict[str, dict[str, Any]] = {}
        curves: dict[str, list] = {}
        for variant, rows in ([] if frame is None else frame.groupby("variant", sort=False)):
            rows = rows.sort_values("step")
            tokens[variant] = [TokenEvolution(**{f: _plain(getattr(r, f), f in INT_FIELDS) for f in TOKEN_FIELDS})
                               for r in rows.itertuples()]  # fmt: skip
            js = torch.tensor([list(v) for v in rows["js_adjacent"]], dtype=torch.float32).T.reshape(n_layers, -1)
            names = [t.token for t in tokens[variant]]
            shift[variant] = {"js_adjacent": js,  # tensors, and the heatmap's row names
                              "js_adjacent_scaled": column_max_abs_scale(js.T.double(), rows=PAPER_HEATMAP_ROWS).T.float()}  # fmt: skip
            shift[variant]["heatmap_row"] = names[: shift[variant]["js_adjacent_scaled"].shape[1]]
            if arrays:
                steps = len(rows)
                lens[variant] = {
                    "prob": torch.tensor([list(v) for v in rows["prob"]], dtype=torch.float32).T,  # [layer, step]
                    "topk_ids": torch.tensor([list(v) for v in rows["topk_ids"]]).reshape(steps, n_layers + 1, top_k).transpose(0, 1),
                    "topk_prob": torch.tensor([list(v) for v in rows["topk_prob"]], dtype=torch.float32)
                    .reshape(steps, n_layers + 1, top_k).transpose(0, 1),
                }  # fmt: skip
                curves[variant] = [(list(i), list(p)) for i, p in zip(rows["curve_ids"], rows["curve_prob"])]
        image = row.image_path
        if getattr(row, "thumbnail", None) is not None:
            image = Image.open(io.BytesIO(row.thumbnail))
        out.append(StoredSample(
            row.sample_id, int(row.index), row.question, row.prompt or "", row.generated_text or "", row.answer,
            None if row.correct is None or row.correct != row.correct else bool(row.correct), bool(row.planted), image,
            tokens, _Trace(int(row.n_steps), list(row.generated_tokens) if row.generated_tokens is not None else []),
            lens, shift, curves, json.loads(row.hallucination) if isinstance(row.hallucination, str) else {},
            json.loads(row.patch_map) if isinstance(getattr(row, "patch_map", None), str) else None))  # fmt: skip
    return out


def _plain(value, integer: bool = False):
    """numpy scalars/arrays and NaN from pandas -> the plain Python values of :class:`TokenEvolution` (an int column
    with nulls comes back as floats: ``integer`` restores the ints)."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return [int(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or (isinstance(value, float) and value != value):
        return None
    return int(value) if integer else value
