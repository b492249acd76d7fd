"""Feature-geometry probes: cosine trajectories and 2-D projections (t-SNE / PCA) of residual features."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from vlm_lens.errors import InputError
from vlm_lens.probes.base import Probe, Source, as_source, layer_labels, register_probe, transition_labels
from vlm_lens.probes.metrics import cosine_similarity
from vlm_lens.probes.result import ProbeResult


def cross_image_cosine(features: Float[Tensor, "image layer d_model"]) -> Float[Tensor, "layer image image"]:
    """cos(h_l^a, h_l^b) for every layer l and pair of images (a, b) at one position."""
    normed = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("ald,bld->lab", normed, normed)


@register_probe
class CosineTrajectory(Probe):
    """Cosine similarity of the residual stream along depth, per position.

    Arrays: ``next`` = cos(h_l, h_{l+1}) ``[transition, position]``; ``final`` = cos(h_l, h_last) ``[layer,
    position]``. :meth:`across` compares images: cos between the same position of several sources, per layer.
    """

    name = "cosine_trajectory"

    def __init__(self, positions: str | Sequence[int] = "steps"):
        self.positions = positions

    def run(self, source: Source) -> ProbeResult:
        positions = source.positions(self.positions if source.trace is not None or self.positions != "steps" else "all")
        stack = source.cache.resid_stack(positions).double()
        labels = layer_labels(source.model.n_layers)
        return ProbeResult(
            self.name,
            {"next": cosine_similarity(stack[:-1], stack[1:]).float(),
             "final": cosine_similarity(stack, stack[-1:].expand_as(stack)).float()},
            {"next": ("transition", "position"), "final": ("layer", "position")},
            {"layer": labels, "transition": transition_labels(labels), "position": positions.tolist()},
            provenance=self.provenance(source, positions=str(self.positions)),
            layout=source.layout,
        )  # fmt: skip

    def across(self, sources: Sequence[Any], position: str | int = "last_prompt", names: Sequence[str] | None = None) -> ProbeResult:
        """Pairwise cosine across ``sources`` (e.g. one per image) at one position, per layer.

        Arrays: ``pairwise`` ``[layer, image, image]`` and ``mean_offdiagonal`` ``[layer]`` (mean over pairs a != b).
        """
        features = features_at(sources, position)  # [image, layer, d]
        pairwise = cross_image_cosine(features.double())
        n = pairwise.shape[1]
        off = ~torch.eye(n, dtype=torch.bool)
        mean_off = pairwise[:, off].mean(-1) if n > 1 else torch.full((pairwise.shape[0],), float("nan"))
        first = as_source(sources[0])
        images = list(names) if names is not None else [str(i) for i in range(n)]
        return ProbeResult(
            self.name,
            {"pairwise": pairwise.float(), "mean_offdiagonal": mean_off.float()},
            {"pairwise": ("layer", "image", "image_b"), "mean_offdiagonal": ("layer",)},
            {"layer": layer_labels(first.model.n_layers), "image": images, "image_b": images},
            provenance=self.provenance(first, position=str(position), n_images=n),
        )


def paper_states(model, stack: Float[Tensor, "layer pos d_model"]) -> Float[Tensor, "layer pos d_model"]:
    """What HF's ``output_hidden_states`` returns for a residual ``stack`` (``cache.resid_stack``, n+1 layers):
    the stack unchanged at indices 0..n-1 (embeddings, then raw ``resid_post`` of blocks 0..n-2) and
    ``final_norm(resid_post of the last block)`` at index n, because HF replaces its last entry with the normed
    ``last_hidden_state`` (paper-spec Q1/Q6). The norm runs in the model's dtype, as in the HF forward."""
    out = stack.clone()
    out[-1] = model.unembedder.normalize(stack[-1]).to(device=out.device, dtype=out.dtype)
    return out


FEATURE_VARIANTS = ("correct", "paper")


def _check_variant(variant: str) -> None:
    if variant not in FEATURE_VARIANTS:
        raise InputError(f"variant must be 'correct' or 'paper', got {variant!r}")


def features_at(
    sources: Sequence[Any], position: str | int, variant: str = "correct"
) -> Float[Tensor, "image layer d_model"]:
    """The residual stack at one position (a name such as ``"last_prompt"``, or an index) of every source,
    ``[image, n+1, d_model]``. ``variant="paper"``: HF's ``hidden_states`` instead (:func:`paper_states`: the last
    layer final-normed)."""
    _check_variant(variant)
    rows = []
    for item in sources:
        src = as_source(item)
        pos = src.positions(position) if isinstance(position, str) else torch.tensor([position])
        if pos.numel() != 1:
            raise InputError(f"position {position!r} selects {pos.numel()} positions; choose one")
        stack = src.cache.resid_stack(pos)
        if variant == "paper":
            stack = paper_states(src.model, stack)
        rows.append(stack[:, 0].float().cpu())
    return torch.stack(rows)


PAPER_PERPLEXITY = {"single": 40.0, "across": 35.0}  # tsne.py (one image, layer x token) / combined_tsne.py


def tsne_settings(n_points: int, perplexity: float, variant: str = "correct", *, learning_rate: float = 200.0,
                  max_iter: int = 2000, random_state: int = 0) -> tuple[dict, float | None]:  # fmt: skip
    """The keyword arguments handed to ``sklearn.manifold.TSNE`` for ``n_points`` points, and the requested
    perplexity when it had to be capped (else None).

    ``paper`` (quirk Q8): ``TSNE(n_components=2, perplexity, learning_rate=200, max_iter=2000, random_state=0,
    init="pca", method="barnes_hut")`` (the authors' call with sklearn's defaults spelled out). sklearn refuses
    ``perplexity >= n_samples``, where the authors' code would fail; only then is the perplexity capped, to
    ``n_points - 1`` (the largest value sklearn accepts, so the cap is continuous with the uncapped range).
    ``correct``: the same, but capped whenever ``3 perplexity > n_points - 1`` (bhtsne's validity rule, every point
    needs 3·perplexity neighbours), to ``max(1, (n_points - 1) / 3)``, and ``method="exact"`` up to 1000 points
    (exact gradients: faster there than Barnes-Hut, and free of its OpenMP spin-waits on a busy 2-core machine).
    """
    _check_variant(variant)
    if n_points < 2:
        raise InputError(f"t-SNE needs at least 2 points, got {n_points}")
    if variant == "paper":
        used = perplexity if perplexity < n_points else float(n_points - 1)
        method = "barnes_hut"
    else:
        used = min(perplexity, max(1.0, (n_points - 1) / 3))
        method = "exact" if n_points <= 1000 else "barnes_hut"
    kwargs = dict(n_components=2, perplexity=used, learning_rate=learning_rate, max_iter=max_iter,
                  random_state=random_state, init="pca", method=method)  # fmt: skip
    return kwargs, (perplexity if used != perplexity else None)


@register_probe
class FeatureProjection(Probe):
    """2-D projection of residual features (paper §3.3): points are (layer x token) of one source, or
    (layer x image) at one position with :meth:`across`. The embedding layer is dropped (the authors'
    ``[:, 1:, :]``), leaving stack layers 1..n; points are fed item-major (all layers of token/image 0, then 1...),
    as the authors build them, each row a ``d_model`` feature vector, MaxAbs-scaled per dimension over all points.

    ``variant`` picks the features:

    - ``"paper"``: what the authors' ``hidden_states[1:]`` holds (:func:`paper_states`): the raw residual stream
      (``resid_post``) for layers 1..n-1 and ``final_norm(resid_post)`` for the last layer n (HF's normed last
      entry; quirk Q6 mixed scales), with the authors' t-SNE settings (:func:`tsne_settings`, quirk Q8).
    - ``"correct"`` (default): the raw residual stream (``resid_post``) at every layer 1..n, the last included
      (one scale throughout, no norm anywhere), t-SNE as :func:`tsne_settings` describes.

    t-SNE defaults (both variants): perplexity 40 for :meth:`run` (tsne.py) and 35 for :meth:`across`
    (combined_tsne.py) unless ``perplexity`` is given, learning rate 200, ``max_iter=2000`` (lower it for speed),
    ``random_state=0``, ``init="pca"``. The provenance records what sklearn was given: ``perplexity`` (used),
    ``perplexity_capped_from`` (the requested value when there were too few points, else None), ``max_iter``,
    ``learning_rate``, ``random_state``, ``init``, ``tsne_method``. ``scale="standard"`` standardises per dimension
    instead; ``method="pca"`` is deterministic and fast.
    """

    name = "feature_projection"

    def __init__(
        self,
        method: Literal["tsne", "pca"] = "tsne",
        positions: str | Sequence[int] = "steps",
        perplexity: float | None = None,
        learning_rate: float = 200.0,
        max_iter: int = 2000,
        random_state: int = 0,
        scale: Literal["maxabs", "standard", "none"] = "maxabs",
        drop_embedding: bool = True,
        variant: Literal["correct", "paper"] = "correct",
    ):
        if method not in ("tsne", "pca"):
            raise InputError(f"method must be 'tsne' or 'pca', got {method!r}")
        _check_variant(variant)
        self.method, self.positions, self.variant = method, positions, variant
        self.perplexity, self.learning_rate, self.max_iter = perplexity, learning_rate, max_iter
        self.random_state, self.scale, self.drop_embedding = random_state, scale, drop_embedding

    def project(self, points: Float[Tensor, "n d"], perplexity: float | None = None) -> Float[Tensor, "n 2"]:
        """Scale, then project ``points`` to 2-D."""
        return self._project(points, perplexity)[0]

    def _project(self, points: Float[Tensor, "n d"], perplexity: float | None = None) -> tuple[Tensor, dict]:
        """``(coords [n, 2], settings)``: scale per dimension, then PCA or t-SNE (:func:`tsne_settings`)."""
        import numpy as np

        x = points.double().cpu().numpy()
        if self.scale == "maxabs":
            from sklearn.preprocessing import MaxAbsScaler

            x = MaxAbsScaler().fit_transform(x)
        elif self.scale == "standard":
            from sklearn.preprocessing import StandardScaler

            x = StandardScaler().fit_transform(x)
        if self.method == "pca":
            from sklearn.decomposition import PCA

            y = PCA(n_components=2, random_state=self.random_state).fit_transform(x)
            settings: dict = {}
        else:
            from sklearn.manifold import TSNE

            requested = self.perplexity if perplexity is None else perplexity
            requested = PAPER_PERPLEXITY["single"] if requested is None else float(requested)
            kwargs, capped_from = tsne_settings(x.shape[0], requested, self.variant, learning_rate=self.learning_rate,
                                                max_iter=self.max_iter, random_state=self.random_state)  # fmt: skip
            y = TSNE(**kwargs).fit_transform(x)
            settings = {k: kwargs[k] for k in ("perplexity", "learning_rate", "max_iter", "random_state", "init")}
            settings.update(perplexity_capped_from=capped_from, tsne_method=kwargs["method"])
        return torch.from_numpy(np.ascontiguousarray(y)).float(), settings

    def _result(self, stack: Tensor, labels: list[str], items: list[str], item_dim: str, source: Any,  # a Source, or what provenance reads of one
                perplexity: float, **prov) -> ProbeResult:  # fmt: skip
        first = 1 if self.drop_embedding else 0
        stack, labels = stack[first:], labels[first:]
        n_layer, n_item = stack.shape[0], stack.shape[1]
        points = stack.transpose(0, 1).reshape(n_item * n_layer, -1)  # item-major: [item, layer] rows
        coords2d, settings = self._project(points, perplexity)
        coords2d = coords2d.reshape(n_item, n_layer, 2).transpose(0, 1).contiguous()
        return ProbeResult(
            self.name,
            {"coords": coords2d},
            {"coords": ("layer", item_dim, "axis")},
            {"layer": labels, item_dim: items, "axis": ["x", "y"]},
            provenance=self.provenance(source, method=self.method, variant=self.variant, scale=self.scale,
                                       features="hf_hidden_states" if self.variant == "paper" else "resid_post",
                                       **settings, **prov),  # fmt: skip
        )

    def project_stack(self, stack: Float[Tensor, "layer item d_model"], items: Sequence[str], item_dim: str, model: Any,
                      perplexity: float | None = None, **prov: Any) -> ProbeResult:  # fmt: skip
        """Project precomputed features: ``stack`` holds all ``n + 1`` stack layers (the embedding is dropped as in
        :meth:`run`) for each item, e.g. states read back from a store. ``item_dim`` is ``"token"`` (one image,
        perplexity 40 by default) or ``"image"`` (across images, 35); ``model`` needs ``name``, ``family`` and
        ``n_layers``. Equal to :meth:`run` / :meth:`across` on the same features."""
        from types import SimpleNamespace

        if perplexity is None:
            perplexity = self.perplexity if self.perplexity is not None else PAPER_PERPLEXITY["single" if item_dim == "token" else "across"]
        return self._result(stack.float().cpu(), layer_labels(model.n_layers), list(items), item_dim,
                            SimpleNamespace(model=model), perplexity, **prov)  # fmt: skip

    def features(self, source: Any) -> Float[Tensor, "layer token d_model"]:
        """The feature vectors :meth:`run` projects, before scaling: ``[layer, token, d_model]`` over stack layers
        1..n (0..n with ``drop_embedding=False``) at this probe's positions (see the class docstring)."""
        src = as_source(source)
        stack, _, _ = self.stack_of(src)
        return stack[1 if self.drop_embedding else 0 :]

    def stack_of(self, source: Any) -> tuple[Float[Tensor, "layer token d_model"], Tensor, list[str]]:
        """The whole residual stack (stack layers 0..n, float32, CPU) at this probe's positions, the positions, and
        their ``"position:token"`` labels: what :meth:`run` projects (the paper variant's last layer normed)."""
        source = as_source(source)
        positions = source.positions(self.positions if source.trace is not None or self.positions != "steps" else "all")
        stack = source.cache.resid_stack(positions)
        if self.variant == "paper":
            stack = paper_states(source.model, stack)
        tokens = [f"{p}:{t}" for p, t in zip(positions.tolist(), source.token_strings(positions))]
        return stack.float().cpu(), positions, tokens

    def run(self, source: Source) -> ProbeResult:
        stack, _, tokens = self.stack_of(source)
        perplexity = PAPER_PERPLEXITY["single"] if self.perplexity is None else self.perplexity
        return self._result(stack, layer_labels(source.model.n_layers), tokens, "token", source, perplexity,
                            positions=str(self.positions))  # fmt: skip

    def across(self, sources: Sequence[Any], position: str | int = "last_prompt", names: Sequence[str] | None = None) -> ProbeResult:
        """(layer x image) points at one position of each source (paper T2: perplexity 35 unless given)."""
        features = features_at(sources, position, self.variant)  # [image, layer, d]
        first = as_source(sources[0])
        images = list(names) if names is not None else [str(i) for i in range(features.shape[0])]
        perplexity = PAPER_PERPLEXITY["across"] if self.perplexity is None else self.perplexity
        return self._result(features.transpose(0, 1), layer_labels(first.model.n_layers), images, "image", first,
                            perplexity, position=str(position))  # fmt: skip
