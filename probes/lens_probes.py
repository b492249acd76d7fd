"""Probes built on the streaming lens pass: logit/tuned lens, token trajectories, distribution shift."""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch

from probes.base import Probe, Source, layer_labels, register_probe, transition_labels
from probes.lens import Lens, LogitLens, TunedLens
from probes.metrics import column_max_abs_scale
from probes.result import ProbeResult
from probes.stream import ALL_STATS, lens_pass


@register_probe
class LogitLensProbe(Probe):
    """Every lens statistic at chosen positions, per layer of the residual stack.

    Arrays (``layer`` = stack layer, ``position`` = sequence position): ``prob`` and ``rank`` of the token each
    position predicts (the generated token at ``positions="steps"``), ``entropy``, ``kl_to_final``,
    ``js_to_final``, ``js_adjacent`` (per ``transition``), ``topk_ids``/``topk_prob`` (``[layer, position, k]``).
    ``candidates=True`` (or a list of stack layers) adds the paper's candidate tokens from the same pass:
    ``candidate_ids`` ``[position, slot]`` and ``candidate_prob`` ``[layer, position, slot]``
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
        arrays = {
            "prob": stats.target_prob[..., 0],
            "rank": stats.target_rank[..., 0],
            "entropy": stats.entropy,
            "kl_to_final": stats.kl_to_final,
            "js_to_final": stats.js_to_final,
            "js_adjacent": stats.js_adjacent,
            "topk_ids": stats.topk_ids,
            "topk_prob": stats.topk_prob,
        }
        lp, tp = ("layer", "position"), ("transition", "position")
        dims = {k: lp for k in ("prob", "rank", "entropy", "kl_to_final", "js_to_final")}
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
    """:class:`LogitLensProbe` read through a trained :class:`~probes.lens.TunedLens`."""

    name = "tuned_lens"

    def __init__(self, lens: TunedLens, positions: str | Sequence[int] = "steps", top_k: int = 5, chunk_rows: int | None = None):
        super().__init__("correct", positions, top_k, chunk_rows)
        if not isinstance(lens, TunedLens):
            raise TypeError("TunedLensProbe needs a TunedLens (TunedLens.for_model(model).fit(...) or TunedLens.load)")
        self.lens = lens


def late_layers(n_layers: int) -> list[int]:
    """The paper's candidate layers scaled to depth: 20..32 of 32 -> the last ``ceil(13/33)`` of the stack."""
    start = math.floor(n_layers * 20 / 32)
    return list(range(start, n_layers + 1))


@register_probe
class TokenTrajectory(Probe):
    """Probability of target tokens at every layer, for each generation step (paper Fig. P).

    ``targets``: ``"generated"`` (the emitted token of each step), a list of single-token strings, or
    ``"candidates"`` (paper-spec §3.1: the distinct top-1 tokens of the late layers at each step, ordered by first
    appearance; the emitted token is always among them). Arrays: ``prob`` ``[layer, step, slot]`` and ``target_ids``
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
        ids = []
        for text in self.targets:
            encoded = source.model.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(encoded) != 1:
                raise ValueError(f"target {text!r} is {len(encoded)} tokens; give single-token strings")
            ids.append(encoded[0])
        return torch.tensor(ids).unsqueeze(0).expand(len(positions), -1)

    def run(self, source: Source) -> ProbeResult:
        model = source.model
        positions = source.positions("steps" if source.trace is not None else "last_prompt")
        stack = source.cache.resid_stack(positions)
        if self.targets == "candidates":  # one pass: late-layer top-1 ids and their probabilities together
            layers = list(self.candidate_layers or late_layers(model.n_layers))
            stats = lens_pass(model, stack, lens=self.lens, target_ids=source.next_tokens(positions).unsqueeze(1),
                              stats=["candidates"], candidate_layers=layers)  # fmt: skip
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
            raise ValueError("this lens result has no candidates: run LogitLensProbe(..., candidates=True)")
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
    KL/JS to the final layer, per position. With ``variant="paper"`` the lens and JS are the authors' and
    ``js_adjacent_scaled`` is their column-wise MaxAbs heatmap (rows = tokens, columns = transitions)."""

    name = "distribution_shift"

    def __init__(self, variant: Literal["correct", "paper"] = "correct", positions: str | Sequence[int] = "steps",
                 lens: Lens | None = None, chunk_rows: int | None = None):  # fmt: skip
        self.variant = variant
        self.positions = positions
        self.lens = lens or LogitLens(variant)
        self.chunk_rows = chunk_rows

    @classmethod
    def from_lens_result(cls, lens: ProbeResult) -> ProbeResult:
        """The distribution-shift view of a :class:`LogitLensProbe` result (same pass, nothing recomputed)."""
        scaled = column_max_abs_scale(lens["js_adjacent"].T.double()).T.float()
        dims = {k: lens.dims[k] for k in ("js_adjacent", "js_to_final", "kl_to_final")}
        dims["js_adjacent_scaled"] = lens.dims["js_adjacent"]
        arrays = {k: lens[k] for k in ("js_adjacent", "js_to_final", "kl_to_final")}
        arrays["js_adjacent_scaled"] = scaled
        coords = {k: v for k, v in lens.coords.items() if k in ("layer", "transition", "position")}
        provenance = {**lens.provenance, "probe": cls.name, "js": lens.provenance.get("variant")}
        return ProbeResult(cls.name, arrays, dims, coords, provenance=provenance, layout=lens.layout)

    def run(self, source: Source) -> ProbeResult:
        model = source.model
        positions = source.positions(self.positions)
        stats = lens_pass(
            model, source.cache.resid_stack(positions), lens=self.lens, js_variant=self.variant,
            stats=["kl_to_final", "js_to_final", "js_adjacent"], chunk_rows=self.chunk_rows,
        )  # fmt: skip
        labels = layer_labels(model.n_layers)
        scaled = column_max_abs_scale(stats.js_adjacent.T.double()).T.float()
        return ProbeResult(
            self.name,
            {
                "js_adjacent": stats.js_adjacent,
                "js_adjacent_scaled": scaled,
                "js_to_final": stats.js_to_final,
                "kl_to_final": stats.kl_to_final,
            },
            {
                "js_adjacent": ("transition", "position"),
                "js_adjacent_scaled": ("transition", "position"),
                "js_to_final": ("layer", "position"),
                "kl_to_final": ("layer", "position"),
            },
            {
                "layer": labels,
                "transition": transition_labels(labels),
                "position": positions.tolist(),
                "token": source.token_strings(positions),
            },
            provenance=self.provenance(source, **self.lens.describe(), js=self.variant),
            layout=source.layout,
        )
