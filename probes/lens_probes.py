"""Probes built on the streaming lens pass: logit/tuned lens, token trajectories, distribution shift."""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch

from vlm_lens.errors import InputError, InputTypeError
from vlm_lens.probes.base import Probe, Source, layer_labels, register_probe, transition_labels
from vlm_lens.probes.lens_stats import ALL_STATS, lens_pass
from vlm_lens.probes.lenses import Lens, LogitLens, TunedLens
from vlm_lens.probes.metrics import PAPER_HEATMAP_ROWS, column_max_abs_scale
from vlm_lens.probes.result import ProbeResult


@register_probe
class LogitLensProbe(Probe):
    """Every lens statistic at chosen positions, per layer of the residual stack.

    Arrays (``layer`` = stack layer, ``position`` = sequence position): ``prob`` and ``rank`` of the token each
    position predicts (the generated token at ``positions="steps"``), ``entropy``, ``kl_to_final``,
    ``js_to_final``, ``js_adjacent`` (per ``transition``), ``topk_ids``/``topk_prob`` (``[layer, position, k]``).
    ``candidates=True`` (:func:`late_layers`, or a list of stack layers) adds the paper's candidate tokens from the
    same pass: the distinct top-1 ids of those layers under this lens, in order of first appearance from the lowest
    layer, nothing appended (paper-spec §3.1, Q12): ``candidate_ids`` ``[position, slot]`` (-1 pads) and
    ``candidate_prob`` ``[layer, position, slot]``
    (:meth:`TokenTrajectory.from_lens_result` turns them into a trajectory without a second projection).
    """

    name = "logit_lens"

    def __init__(
        self,
        variant: Literal["correct", "paper"] = "correct",
        positions: str | Sequence[int] = "steps",
        top_k: int = 5,
        chunk_rows: int | None = None,
        candidates: bool | Sequence[int] = False,
    ):
        self.lens: Lens = LogitLens(variant)
        self.variant = variant
        self.positions = positions
        self.top_k = top_k
        self.chunk_rows = chunk_rows
        self.candidates = candidates

    def run(self, source: Source) -> ProbeResult:
        model = source.model
        positions = source.positions(self.positions)
        targets = source.next_tokens(positions)
        stack = source.cache.resid_stack(positions)
        candidate_layers = None
        if self.candidates is not False:
            candidate_layers = late_layers(model.n_layers) if self.candidates is True else list(self.candidates)
        stats = lens_pass(
            model, stack, lens=self.lens, target_ids=targets, top_k=self.top_k, js_variant=self.variant,
            chunk_rows=self.chunk_rows, candidate_layers=candidate_layers,
            stats=ALL_STATS + (("candidates",) if candidate_layers is not None else ()),
        )  # fmt: skip
        labels = layer_labels(model.n_layers)
        arrays: dict[str, Any] = {
            "prob": stats.target_prob[..., 0],  # type: ignore[index]  # targets were given: the stats hold them
            "rank": stats.target_rank[..., 0],  # type: ignore[index]
            "entropy": stats.entropy,
            "kl_to_final": stats.kl_to_final,
            "js_to_final": stats.js_to_final,
            "js_adjacent": stats.js_adjacent,
            "topk_ids": stats.topk_ids,
            "topk_prob": stats.topk_prob,
        }
        lp, tp = ("layer", "position"), ("transition", "position")
        dims: dict[str, tuple[str, ...]] = {k: lp for k in ("prob", "rank", "entropy", "kl_to_final", "js_to_final")}
        dims.update(js_adjacent=tp, topk_ids=lp + ("k",), topk_prob=lp + ("k",))
        if candidate_layers is not None:
            arrays.update(candidate_ids=stats.candidate_ids, candidate_prob=stats.candidate_prob)
            dims.update(candidate_ids=("position", "slot"), candidate_prob=lp + ("slot",))
        coords = {
            "layer": labels,
            "transition": transition_labels(labels),
            "position": positions.tolist(),
            "target": model.tokenizer.convert_ids_to_tokens(targets.tolist()),
        }
        return ProbeResult(
            self.name, arrays, dims, coords,
            provenance=self.provenance(
                source, **self.lens.describe(), positions=str(self.positions),
                **({} if candidate_layers is None else {"candidate_layers": candidate_layers}),
            ),
            layout=source.layout,
        )  # fmt: skip


@register_probe
class TunedLensProbe(LogitLensProbe):
    """:class:`LogitLensProbe` read through a trained :class:`~vlm_lens.probes.lenses.TunedLens`."""

    name = "tuned_lens"

    def __init__(self, lens: TunedLens, positions: str | Sequence[int] = "steps", top_k: int = 5,
                 chunk_rows: int | None = None, candidates: bool | Sequence[int] = False):  # fmt: skip
        super().__init__("correct", positions, top_k, chunk_rows, candidates)
        if not isinstance(lens, TunedLens):
            raise InputTypeError("TunedLensProbe needs a TunedLens (TunedLens.for_model(model).fit(...) or TunedLens.load)")
        self.lens = lens


def late_layers(n_layers: int) -> list[int]:
    """The paper's candidate layers scaled to depth: stack indices ``floor(20 n / 32) .. n`` (inclusive).

    The authors use ``range(20, 33)`` over the 33 HF states of the 32-layer 7B model (stack index 0 = embeddings,
    n = last layer); the start is scaled proportionally: n = 32 -> 20..32 (13 states, exactly the paper's),
    n = 40 -> 25..40, n = 24 -> 15..24, n = 8 -> 5..8, n = 4 -> 2..4. The authors' comment for 13B (40 layers),
    "consider using layers 20 to 40", is a fixed start, not a proportional one, and is *not* what this returns
    (no single scaling gives 20 for both 32 and 40); pass ``candidates=list(range(20, 41))`` to reproduce it.
    """
    start = math.floor(n_layers * 20 / 32)
    return list(range(start, n_layers + 1))


@register_probe
class TokenTrajectory(Probe):
    """Probability of target tokens at every layer, for each generation step (paper Fig. P).

    ``targets``: ``"generated"`` (the emitted token of each step), a list of single-token strings, or
    ``"candidates"`` (paper-spec §3.1, Q12: the distinct top-1 tokens of ``candidate_layers``, default
    :func:`late_layers`, under this lens at each step, ordered by first appearance from the lowest layer; nothing
    else is added. When the last layer is among them its top-1, the emitted token under greedy decoding, is
    included by construction, not by appending). Arrays: ``prob`` ``[layer, step, slot]`` and ``target_ids``
    ``[step, slot]`` (-1 pads unused slots, whose probabilities are NaN).
    """

    name = "token_trajectory"

    def __init__(
        self,
        targets: str | Sequence[str] = "generated",
        variant: Literal["correct", "paper"] = "correct",
        lens: Lens | None = None,
        candidate_layers: Sequence[int] | None = None,
    ):
        self.targets = targets
        self.lens = lens or LogitLens(variant)
        self.candidate_layers = candidate_layers

    def _named_ids(self, source: Source, positions) -> torch.Tensor:
        if self.targets == "generated":
            return source.next_tokens(positions).unsqueeze(1)
        ids = [source.model.to_single_token(text) for text in self.targets]  # ValueError naming the pieces otherwise
        return torch.tensor(ids).unsqueeze(0).expand(len(positions), -1)

    def run(self, source: Source) -> ProbeResult:
        model = source.model
        positions = source.positions("steps" if source.trace is not None else "last_prompt")
        stack = source.cache.resid_stack(positions)
        if self.targets == "candidates":  # one pass: late-layer top-1 ids and their probabilities together
            layers = list(self.candidate_layers or late_layers(model.n_layers))
            stats = lens_pass(model, stack, lens=self.lens, stats=["candidates"], candidate_layers=layers)
            target_ids, prob = stats.candidate_ids, stats.candidate_prob
        else:
            target_ids = self._named_ids(source, positions)
            prob = lens_pass(model, stack, lens=self.lens, target_ids=target_ids, stats=["target"]).target_prob
        step_tokens = model.tokenizer.convert_ids_to_tokens(source.next_tokens(positions).tolist())
        return self._result(prob, target_ids, step_tokens, model.n_layers,
                            self.provenance(source, **self.lens.describe(), targets=str(self.targets)), source.layout)  # fmt: skip

    @classmethod
    def from_lens_result(cls, lens: ProbeResult) -> ProbeResult:
        """The candidate trajectory of a :class:`LogitLensProbe` run with ``candidates=...`` (nothing recomputed)."""
        if "candidate_prob" not in lens.arrays:
            raise InputError("this lens result has no candidates: run LogitLensProbe(..., candidates=True)")
        provenance = {**lens.provenance, "probe": cls.name, "targets": "candidates"}
        return cls._result(lens["candidate_prob"], lens["candidate_ids"], lens.coords["target"],
                           len(lens.coords["layer"]) - 1, provenance, lens.layout)  # fmt: skip

    @classmethod
    def _result(cls, prob, target_ids, step_tokens, n_layers, provenance, layout) -> ProbeResult:
        return ProbeResult(
            cls.name,
            {"prob": prob, "target_ids": target_ids},
            {"prob": ("layer", "step", "slot"), "target_ids": ("step", "slot")},
            {"layer": layer_labels(n_layers), "step": list(step_tokens)},
            provenance=provenance,
            layout=layout,
        )


@register_probe
class DistributionShift(Probe):
    """How much the next-token distribution moves between layers (paper §3.2): JS between adjacent layers and
    KL/JS to the final layer, per position. With ``variant="paper"`` the lens and JS are the authors'.

    Arrays: ``js_adjacent`` ``[transition, position]``, ``js_to_final`` and ``kl_to_final`` ``[layer, position]``,
    and ``js_adjacent_scaled`` ``[transition, heatmap_row]``: heatmap.py's figure, i.e. the first
    ``heatmap_rows`` (default 40) positions only (``all_js[:40]``; later positions are dropped, not scaled), each
    column (transition) divided by its max |value| over those rows (``MaxAbsScaler().fit_transform``, quirk Q4).
    Coordinates: ``token`` labels each position with the token it *predicts* (:meth:`Source.next_tokens`: for
    generation steps the generated token of that step, as heatmap.py labels row j with generated token g_j), and
    ``heatmap_row`` the same labels for the heatmap's rows.
    """

    name = "distribution_shift"

    def __init__(
        self,
        variant: Literal["correct", "paper"] = "correct",
        positions: str | Sequence[int] = "steps",
        lens: Lens | None = None,
        chunk_rows: int | None = None,
        heatmap_rows: int | None = PAPER_HEATMAP_ROWS,
    ):
        self.variant = variant
        self.positions = positions
        self.lens = lens or LogitLens(variant)
        self.chunk_rows = chunk_rows
        self.heatmap_rows = heatmap_rows

    @staticmethod
    def _arrays(js_adjacent, js_to_final, kl_to_final, tokens, heatmap_rows) -> tuple[dict, dict, dict]:
        """Arrays, dims and the token coordinates; the heatmap keeps the first ``heatmap_rows`` positions."""
        scaled = column_max_abs_scale(js_adjacent.T.double(), rows=heatmap_rows).T.float()  # [transition, kept]
        arrays = {"js_adjacent": js_adjacent, "js_adjacent_scaled": scaled, "js_to_final": js_to_final,
                  "kl_to_final": kl_to_final}  # fmt: skip
        dims = {
            "js_adjacent": ("transition", "position"),
            "js_adjacent_scaled": ("transition", "heatmap_row"),
            "js_to_final": ("layer", "position"),
            "kl_to_final": ("layer", "position"),
        }
        coords = {"token": list(tokens), "heatmap_row": list(tokens)[: scaled.shape[1]]}
        return arrays, dims, coords

    @classmethod
    def from_lens_result(cls, lens: ProbeResult, heatmap_rows: int | None = PAPER_HEATMAP_ROWS) -> ProbeResult:
        """The distribution-shift view of a :class:`LogitLensProbe` result (same pass, nothing recomputed).

        ``token`` is the lens result's ``target`` coordinate: the token each position predicts."""
        arrays, dims, token_coords = cls._arrays(lens["js_adjacent"], lens["js_to_final"], lens["kl_to_final"],
                                                 lens.coords["target"], heatmap_rows)  # fmt: skip
        coords = {k: v for k, v in lens.coords.items() if k in ("layer", "transition", "position")}
        coords.update(token_coords)
        provenance = {**lens.provenance, "probe": cls.name, "js": lens.provenance.get("variant"),
                      "heatmap_rows": heatmap_rows}  # fmt: skip
        return ProbeResult(cls.name, arrays, dims, coords, provenance=provenance, layout=lens.layout)

    def run(self, source: Source) -> ProbeResult:
        model = source.model
        positions = source.positions(self.positions)
        stats = lens_pass(
            model, source.cache.resid_stack(positions), lens=self.lens, js_variant=self.variant,
            stats=["kl_to_final", "js_to_final", "js_adjacent"], chunk_rows=self.chunk_rows,
        )  # fmt: skip
        labels = layer_labels(model.n_layers)
        predicted = model.tokenizer.convert_ids_to_tokens(source.next_tokens(positions).tolist())
        arrays, dims, token_coords = self._arrays(stats.js_adjacent, stats.js_to_final, stats.kl_to_final,
                                                  predicted, self.heatmap_rows)  # fmt: skip
        coords = {"layer": labels, "transition": transition_labels(labels), "position": positions.tolist()}
        coords.update(token_coords)
        return ProbeResult(
            self.name, arrays, dims, coords,
            provenance=self.provenance(source, **self.lens.describe(), js=self.variant, heatmap_rows=self.heatmap_rows),
            layout=source.layout,
        )  # fmt: skip
