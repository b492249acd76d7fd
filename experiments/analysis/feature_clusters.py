"""Feature clusters (paper §3.3): the two t-SNE views and their quantitative counterparts.

- single image: (layer x generated token) points of one trace, coloured by layer group (paper T1, perplexity 40);
- many images: (layer x image) points at one answer-predicting position (paper T2, perplexity 35);
- per layer: mean pairwise cosine similarity across images at that position (high in shallow layers = the
  "guitar neck"), and, when answers are known, the silhouette score of the answer labels (how well deep features
  separate images by answer = the "body"); both averaged per stage.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from vlm_lens.probes import CosineTrajectory, FeatureProjection
from vlm_lens.probes.geometry import features_at


def layer_groups(n_layers: int, critical: int | None, mutation: int | None) -> list[str]:
    """Stage name of every stack layer 0..n (embedding first), ``n_layers + 1`` names.

    Layer l is ``rapid_evolution`` for l < critical, ``stabilization`` for critical <= l < mutation and
    ``mutation`` for l >= mutation (and >= critical). ``mutation=None`` (no mutation stage detected):
    stabilization runs from the critical layer to the last layer n. ``critical=None`` (no stages detected): every
    layer is ``rapid_evolution``, whatever ``mutation`` says.
    """
    if critical is None:
        return ["rapid_evolution"] * (n_layers + 1)
    m = mutation if mutation is not None else n_layers + 1
    return ["rapid_evolution" if l < critical else ("stabilization" if l < m else "mutation")
            for l in range(n_layers + 1)]  # fmt: skip


def silhouette_per_layer(features: torch.Tensor, labels: Sequence[str]) -> list[float | None]:
    """Silhouette score (cosine distance) of ``labels`` among images at every layer; None when undefined."""
    from sklearn.metrics import silhouette_score

    distinct = len(set(labels))
    if distinct < 2 or distinct >= len(labels):
        return [None] * features.shape[1]
    return [float(silhouette_score(features[:, l].double().numpy(), list(labels), metric="cosine"))
            for l in range(features.shape[1])]  # fmt: skip


def run(traces: Sequence, critical: int | None, mutation: int | None, *, answers: Sequence[str] | None = None,
        method: Literal["tsne", "pca"] = "tsne", position: str = "last_prompt", max_iter: int = 2000,
        variant: Literal["correct", "paper"] = "correct") -> dict:  # fmt: skip
    """Both views and the per-layer numbers. ``position`` picks the cross-image position in each trace.

    ``critical``/``mutation``: stage boundaries (stack indices) or None when not detected (:func:`layer_groups`).
    ``variant`` picks the t-SNE features and settings (:class:`vlm_lens.probes.FeatureProjection`): ``"paper"`` feeds HF's
    ``hidden_states[1:]`` (raw residuals for layers 1..n-1, the final-normed last layer) with the authors' t-SNE
    (perplexity 40 for one image, 35 across images, learning rate 200, ``max_iter`` default 2000, seed 0, PCA
    init, Barnes-Hut); ``"correct"`` the raw residual stream at every layer 1..n. The settings sklearn received
    (perplexity, whether and from what it was capped, max_iter ...) are in ``["single"|"across"]["tsne"]``. The
    cosine and silhouette numbers always use the raw residual stream (they are not the paper's).
    """
    from vlm_lens.probes.base import as_source
    from vlm_lens.probes.geometry import paper_states

    model = traces[0].cache.model
    single, _, tokens = FeatureProjection().stack_of(as_source(traces[0]))  # raw [n+1, token, d] and its labels
    across = features_at(traces, position) if len(traces) >= 2 else None  # raw [image, n+1, d]
    labels = list(answers) if answers is not None else [t.text for t in traces]
    return from_features(single, tokens, across, [str(i) for i in range(len(traces))], labels,
                         CosineTrajectory().across(traces, position)["mean_offdiagonal"].tolist() if across is not None else None,
                         model, critical, mutation, method=method, max_iter=max_iter, variant=variant, position=position,
                         single_last_normed=paper_states(model, single)[-1] if variant == "paper" else None,
                         across_last_normed=paper_states(model, across.transpose(0, 1))[-1]
                         if variant == "paper" and across is not None else None)  # fmt: skip


def _settings(result) -> dict:
    """The projection settings recorded in a FeatureProjection result's provenance (JSON-ready)."""
    keys = ("method", "variant", "features", "scale", "perplexity", "perplexity_capped_from", "learning_rate",
            "max_iter", "random_state", "init", "tsne_method")  # fmt: skip
    return {k: result.provenance[k] for k in keys if k in result.provenance}


def mean_pairwise_cosine(unit_sum: Float[Tensor, "layer d_model"], n_images: int) -> list[float | None]:
    """Mean off-diagonal cosine per layer from streamed sums: for unit vectors u_1..u_N (one per image) at a layer,
    sum_{a != b} u_a . u_b = ||sum_a u_a||^2 - N, so the mean over the N(N-1) ordered pairs is
    (||S||^2 - N) / (N (N - 1)). ``unit_sum``: ``[layer, d]`` = S per layer (float64). Equal to
    ``CosineTrajectory().across(...)["mean_offdiagonal"]`` without holding every image's features."""
    if n_images < 2:
        return [None] * unit_sum.shape[0]
    return (((unit_sum * unit_sum).sum(-1) - n_images) / (n_images * (n_images - 1))).tolist()


def from_features(single: Float[Tensor, "layer token d_model"] | None, single_tokens: Sequence[str],
                  across: Float[Tensor, "image layer d_model"] | None, names: Sequence[str], labels: Sequence[str],
                  mean_cosine: list | None, model, critical: int | None, mutation: int | None, *,
                  method: Literal["tsne", "pca"] = "tsne", max_iter: int = 2000, variant: Literal["correct", "paper"] = "correct", position: str = "last_prompt",
                  single_last_normed: Float[Tensor, "token d_model"] | None = None,
                  across_last_normed: Float[Tensor, "image d_model"] | None = None,
                  n_images_total: int | None = None) -> dict:  # fmt: skip
    """:func:`run`'s output from precomputed raw residual features (a trace or a store): ``single`` (one image, all
    n+1 stack layers), ``across`` at the answer position (possibly a capped subset of the images, named by ``names``),
    ``mean_cosine`` per layer over *all* images (:func:`mean_pairwise_cosine` when streamed), ``labels`` the answers
    (or generated texts) of the ``across`` images for the silhouette. ``variant="paper"`` projects HF's states: the
    last layer replaced by ``*_last_normed`` (required then); cosine and silhouette always use the raw stream."""
    n = model.n_layers
    groups = layer_groups(n, critical, mutation)
    out: dict = {"layer_groups": groups}
    projection = FeatureProjection(method, max_iter=max_iter, variant=variant)
    if single is not None:
        shown = _with_last(single, single_last_normed) if variant == "paper" else single
        result = projection.project_stack(shown, single_tokens, "token", model, positions="steps")
        out["single"] = {"coords": result["coords"].tolist(), "tokens": result.coords["token"],
                         "layers": result.coords["layer"], "tsne": _settings(result)}  # fmt: skip
    if across is not None and across.shape[0] >= 2:
        shown = across.transpose(0, 1)  # [layer, image, d]
        shown = _with_last(shown, across_last_normed) if variant == "paper" else shown
        result = projection.project_stack(shown, list(names), "image", model, position=str(position))
        silhouette = silhouette_per_layer(across, list(labels))
        mean_cos = mean_cosine if mean_cosine is not None else [None] * (n + 1)
        by_group = {}
        for g in ("rapid_evolution", "stabilization", "mutation"):
            idx = [l for l, name in enumerate(groups) if name == g]
            cos = [float(v) for v in (mean_cos[l] for l in idx) if v is not None]
            sil = [float(v) for v in (silhouette[l] for l in idx) if v is not None]
            by_group[g] = {"mean_cosine": sum(cos) / len(cos) if cos else None,
                           "silhouette": sum(sil) / len(sil) if sil else None}  # fmt: skip
        out["across"] = {"coords": result["coords"].tolist(), "layers": result.coords["layer"],
                         "images": result.coords["image"], "labels": list(labels), "tsne": _settings(result),
                         "images_projected": int(across.shape[0]), "images_total": n_images_total or int(across.shape[0])}  # fmt: skip
        out["mean_cosine_per_layer"] = mean_cos
        out["silhouette_per_layer"] = silhouette
        out["by_group"] = by_group
    return out


def _with_last(stack: Tensor, last: Tensor | None) -> Tensor:
    """``stack`` ``[n+1, item, d]`` with its last layer replaced by ``last`` ``[item, d]`` (HF's normed last state)."""
    if last is None:
        raise ValueError("variant='paper' projects HF's states: pass the final-normed last layer too")
    return torch.cat([stack[:-1], last.to(stack.dtype).unsqueeze(0)])
