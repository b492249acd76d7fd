"""ProbeResult: named arrays with named dims, labels, token layout and provenance; pandas, plotly, safetensors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlm_lens.errors import InputError, InputTypeError, NotFoundError, UnknownNameError
from vlm_lens.layout import TokenLayout


@dataclass
class ProbeResult:
    """What a probe returns.

    ``arrays[name]`` is a tensor whose axes are named by ``dims[name]`` (e.g. ``("layer", "position")``);
    ``coords[dim]`` labels the entries of a dim (layer labels, positions, token strings ...). ``layout`` is the token
    layout of the sequence (for per-role aggregation), ``provenance`` says which model, lens and variant produced it.
    """

    probe: str
    arrays: dict[str, Tensor]
    dims: dict[str, tuple[str, ...]]
    coords: dict[str, list] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    layout: TokenLayout | None = None

    def __post_init__(self) -> None:
        for name, array in self.arrays.items():
            if name not in self.dims:
                raise InputError(f"array {name!r} has no dims; give dims[{name!r}] = (dim names)")
            if array.dim() != len(self.dims[name]):
                raise InputError(f"array {name!r} has {array.dim()} axes but dims {self.dims[name]}")
            for axis, dim in enumerate(self.dims[name]):
                if dim in self.coords and len(self.coords[dim]) != array.shape[axis]:
                    raise InputError(
                        f"coords[{dim!r}] has {len(self.coords[dim])} labels but {name!r} has {array.shape[axis]}"
                    )

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.arrays:
            raise UnknownNameError(f"{self.probe} result has no {name!r}; it has {sorted(self.arrays)}")
        return self.arrays[name]

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}{tuple(v.shape)}" for k, v in self.arrays.items())
        return f"ProbeResult({self.probe}: {parts})"

    # -- aggregation ----------------------------------------------------------------------------------------
    def by_role(self, name: str, reduce: str = "mean") -> dict[str, Tensor]:
        """Reduce ``name`` over its ``position`` dim separately for image, prompt-text and generated tokens."""
        self[name]  # an unknown name: the error lists the names there are
        if self.layout is None or "position" not in self.dims[name]:
            raise InputError(f"{name!r} has no position dim with a token layout to aggregate by role")
        axis = self.dims[name].index("position")
        positions = torch.as_tensor(self.coords["position"])
        out = {}
        for role in ("image", "text", "generated"):
            chosen = self.layout.mask(role)[positions]
            if chosen.any():
                values = self.arrays[name].index_select(axis, torch.nonzero(chosen).flatten()).float()
                out[role] = values.nanmean(axis) if reduce == "mean" else values.nanmedian(axis).values
        return out

    # -- export ---------------------------------------------------------------------------------------------
    def to_dataframe(self, name: str | None = None):
        """Long-format pandas DataFrame: one row per entry, a column per dim (labels where known), ``value``.

        Without ``name``, every array is stacked with a ``quantity`` column.
        """
        import pandas as pd

        names = [name] if name is not None else list(self.arrays)
        frames = []
        for key in names:
            array = self[key].detach().cpu()
            dims = self.dims[key]
            index = torch.cartesian_prod(*[torch.arange(n) for n in array.shape]) if array.dim() > 1 else (
                torch.arange(array.shape[0]).unsqueeze(1) if array.dim() == 1 else torch.zeros(1, 0, dtype=torch.long)
            )
            data: dict[str, Any] = {}
            for axis, dim in enumerate(dims):
                idx = index[:, axis].tolist()
                labels = self.coords.get(dim)
                data[dim] = [labels[i] for i in idx] if labels is not None else idx
            data["value"] = array.reshape(-1).tolist()
            frame = pd.DataFrame(data)
            frame.insert(0, "quantity", key)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]

    def figure(self, name: str | None = None):
        """A plotly figure of ``name`` (default: the first array): heatmap for 2-D, lines for 1-D, the first
        slice of the last axis for 3-D."""
        import plotly.graph_objects as go

        key = name or next(iter(self.arrays))
        array = self[key].detach().float().cpu()
        dims = self.dims[key]
        if array.dim() == 3:
            array, dims = array[..., 0], dims[:2]
        title = f"{self.probe}: {key}"
        if array.dim() == 1:
            x = self.coords.get(dims[0], list(range(array.shape[0])))
            fig = go.Figure(go.Scatter(x=[str(v) for v in x], y=array.tolist(), mode="lines+markers"))
            fig.update_layout(title=title, xaxis_title=dims[0], yaxis_title=key)
            return fig
        rows = self.coords.get(dims[0], list(range(array.shape[0])))
        fig = go.Figure(go.Heatmap(z=array.T.tolist(), x=[str(v) for v in rows], y=self._axis_labels(dims[1], array.shape[1])))
        fig.update_layout(title=title, xaxis_title=dims[0], yaxis_title=dims[1], yaxis_autorange="reversed")
        return fig

    def _axis_labels(self, dim: str, size: int) -> list[str]:
        """Readable tick labels: a position with the token it predicts (``12 → red``) or holds, a step with its
        token; escaped, because plotly renders a subset of HTML (``</s>`` would vanish)."""
        import html

        values = self.coords.get(dim, list(range(size)))
        tokens = None
        if dim in ("position", "heatmap_row"):
            tokens = self.coords.get("target") or self.coords.get("token")
        if tokens is not None and len(tokens) >= size and dim == "position":
            labels = [f"{p} → {t}" for p, t in zip(values, tokens)]
        elif all(isinstance(v, int) for v in values):
            labels = [str(v) for v in values]
        else:  # token strings repeat ("the", "</s>"): keep rows apart, plotly merges equal category labels
            labels = [f"{i}:{v}" for i, v in enumerate(values)]
        return [html.escape(label, quote=False) for label in labels]

    # -- persistence ----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the folder ``path`` (``arrays.safetensors`` + ``result.json``) atomically. No pickle."""
        from safetensors.torch import save_file

        from vlm_lens.atomic import write_folder

        path = Path(path)
        with write_folder(path) as tmp:  # replaces an existing result in one rename; a failure leaves it intact
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.arrays.items()}
            if self.layout is not None:
                for role in ("image", "text", "generated"):
                    tensors[f"__layout__.{role}"] = getattr(self.layout, role).to(torch.uint8)
            save_file(tensors, str(tmp / "arrays.safetensors"))
            meta = {
                "probe": self.probe,
                "dims": {k: list(v) for k, v in self.dims.items()},
                "coords": self.coords,
                "provenance": self.provenance,
                "last_prompt_position": None if self.layout is None else self.layout.last_prompt_position,
            }
            (tmp / "result.json").write_text(json.dumps(meta, indent=1, default=_jsonable))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ProbeResult":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "result.json").exists():
            raise NotFoundError(f"{path} is not a saved ProbeResult (result.json missing)")
        meta = json.loads((path / "result.json").read_text())
        tensors = load_file(str(path / "arrays.safetensors"))
        layout = None
        if "__layout__.image" in tensors:
            layout = TokenLayout(
                image=tensors.pop("__layout__.image").bool(),
                text=tensors.pop("__layout__.text").bool(),
                generated=tensors.pop("__layout__.generated").bool(),
                last_prompt_position=meta["last_prompt_position"],
            )
        return cls(
            probe=meta["probe"],
            arrays=tensors,
            dims={k: tuple(v) for k, v in meta["dims"].items()},
            coords=meta["coords"],
            provenance=meta["provenance"],
            layout=layout,
        )


def _jsonable(value):
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise InputTypeError(f"cannot store {type(value).__name__} in result.json")
