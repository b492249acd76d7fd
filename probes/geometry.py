"""Feature-geometry probes: cosine trajectories and 2-D projections (t-SNE / PCA) of residual features."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from probes.base import Probe, Source, as_source, layer_labels, register_probe, transition_labels
from probes.metrics import cosine_similarity
from probes.result import ProbeResult


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


def features_at(sources: Sequence[Any], position: str | int) -> Float[Tensor, "image layer d_model"]:
    """The residual stack at one position (a name such as ``"last_prompt"``, or an index) of every source."""
    rows = []
    for item in sources:
        src = as_source(item)
        pos = src.positions(position) if isinstance(position, str) else torch.tensor([position])
        if pos.numel() != 1:
            raise ValueError(f"position {position!r} selects {pos.numel()} positions; choose one")
        rows.append(src.cache.resid_stack(pos)[:, 0].float().cpu())
    return torch.stack(rows)


@register_probe
class FeatureProjection(Probe):
    """2-D projection of residual features (paper §3.3): points are (layer x token) of one source, or
    (layer x image) at one position with :meth:`across`.

    Paper defaults (quirk Q8): t-SNE, perplexity 40 (35 across images), learning rate 200, 2000 iterations,
    ``random_state=0``, ``init="pca"``; features MaxAbs-scaled per dimension; the embedding layer dropped.
    ``scale="standard"`` standardises per dimension instead; ``method="pca"`` is deterministic and fast.
    """

    name = "feature_projection"

    def __init__(
        self,
        method: Literal["tsne", "pca"] = "tsne",
        positions: str | Sequence[int] = "steps",
        perplexity: float = 40.0,
        learning_rate: float = 200.0,
        max_iter: int = 2000,
        random_state: int = 0,
        scale: Literal["maxabs", "standard", "none"] = "maxabs",
        drop_embedding: bool = True,
    ):
        if method not in ("tsne", "pca"):
            raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}")
        self.method, self.positions = method, positions
        self.perplexity, self.learning_rate, self.max_iter = perplexity, learning_rate, max_iter
        self.random_state, self.scale, self.drop_embedding = random_state, scale, drop_embedding

    def project(self, points: Float[Tensor, "n d"]) -> Float[Tensor, "n 2"]:
        """Scale, then project ``points`` to 2-D."""
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
        else:
            from sklearn.manifold import TSNE

            perplexity = min(self.perplexity, max(1.0, (x.shape[0] - 1) / 3))  # t-SNE needs perplexity < n
            # Exact gradients for the few hundred points of a typical view: faster than Barnes-Hut there, and
            # free of its OpenMP spin-waits on a busy 2-core machine.
            method = "exact" if x.shape[0] <= 1000 else "barnes_hut"
            y = TSNE(
                n_components=2, perplexity=perplexity, learning_rate=self.learning_rate, max_iter=self.max_iter,
                random_state=self.random_state, init="pca", method=method,
            ).fit_transform(x)  # fmt: skip
        return torch.from_numpy(np.ascontiguousarray(y)).float()

    def _result(self, stack: Tensor, labels: list[str], items: list[str], item_dim: str, source: Source, **prov) -> ProbeResult:
        first = 1 if self.drop_embedding else 0
        stack, labels = stack[first:], labels[first:]
        n_layer, n_item = stack.shape[0], stack.shape[1]
        coords2d = self.project(stack.reshape(n_layer * n_item, -1)).reshape(n_layer, n_item, 2)
        return ProbeResult(
            self.name,
            {"coords": coords2d},
            {"coords": ("layer", item_dim, "axis")},
            {"layer": labels, item_dim: items, "axis": ["x", "y"]},
            provenance=self.provenance(source, method=self.method, perplexity=self.perplexity, scale=self.scale, **prov),
        )

    def run(self, source: Source) -> ProbeResult:
        positions = source.positions(self.positions if source.trace is not None or self.positions != "steps" else "all")
        stack = source.cache.resid_stack(positions).float().cpu()
        tokens = [f"{p}:{t}" for p, t in zip(positions.tolist(), source.token_strings(positions))]
        return self._result(stack, layer_labels(source.model.n_layers), tokens, "token", source,
                            positions=str(self.positions))  # fmt: skip

    def across(self, sources: Sequence[Any], position: str | int = "last_prompt", names: Sequence[str] | None = None) -> ProbeResult:
        """(layer x image) points at one position of each source (paper T2 uses perplexity 35)."""
        features = features_at(sources, position)  # [image, layer, d]
        first = as_source(sources[0])
        images = list(names) if names is not None else [str(i) for i in range(features.shape[0])]
        return self._result(features.transpose(0, 1), layer_labels(first.model.n_layers), images, "image", first,
                            position=str(position))  # fmt: skip
