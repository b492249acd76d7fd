"""Argument checks shared by the hooked model's entry points: one clear error (from :mod:`vlm_lens.errors`) that names
the fix, raised before a library would fail with a message about its own internals."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

from torch import Tensor

from vlm_lens.errors import InputError, InputTypeError, ShapeError, VocabularyError

HOOK_SIGNATURE = "fn(activation, hook) -> None | Tensor"


def hook_pairs(fwd_hooks: Any) -> list[tuple[Any, Callable]]:
    """``fwd_hooks`` as a list of ``(name, fn)`` pairs; a bare pair (a common slip) or a malformed entry is refused."""
    if isinstance(fwd_hooks, tuple) and len(fwd_hooks) == 2 and isinstance(fwd_hooks[0], str) and callable(fwd_hooks[1]):
        raise InputTypeError(f"fwd_hooks is a list of (name, fn) pairs; got one bare pair: wrap it in a list, "
                             f"fwd_hooks=[({fwd_hooks[0]!r}, fn)]")  # fmt: skip
    if isinstance(fwd_hooks, (str, bytes)) or not isinstance(fwd_hooks, Iterable):
        raise InputTypeError(f"fwd_hooks is a list of (name, fn) pairs, got {type(fwd_hooks).__name__}")
    pairs = list(fwd_hooks)
    for entry in pairs:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and callable(entry[1])):
            raise InputTypeError(f"each fwd_hooks entry is a (name, fn) pair with fn = {HOOK_SIGNATURE}, got {entry!r}")
        hook_fn(entry[0], entry[1])
    return [tuple(entry) for entry in pairs]


def hook_fn(name: Any, fn: Callable) -> None:
    """Refuse a hook function that cannot be called as ``fn(activation, hook)`` (e.g. ``lambda a: a``)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C callable: nothing to inspect
    try:
        signature.bind(None, None)
    except TypeError:
        raise InputTypeError(f"the hook on {name!r} must take two arguments, {HOOK_SIGNATURE}; got {fn!r} with "
                             f"signature {signature}: add the hook parameter, e.g. lambda activation, hook: ...") from None


def new_tokens(max_new_tokens: Any) -> int:
    """``max_new_tokens`` as a positive int (a string or float from a config is refused, naming the type)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise InputTypeError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r} ({type(max_new_tokens).__name__})")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return max_new_tokens


def inputs_fit(model, inputs) -> None:
    """Refuse inputs prepared by another model: another family's inputs or token ids outside this vocabulary would
    fail deep inside the forward (an embedding ``IndexError``) or, worse, run with the wrong positions."""
    family = getattr(inputs, "family", None)
    if family is not None and family != model.family:
        raise InputError(f"these inputs were prepared by a {family} model ({inputs.prepared_by}), not by this "
                         f"{model.family} model ({model.name}): prepare them with this model, model.prepare(image, prompt)")  # fmt: skip
    ids = inputs.model_inputs.get("input_ids")
    if ids is not None and ids.numel() and int(ids.max()) >= model.d_vocab:
        raise VocabularyError(f"token id {int(ids.max())} is outside this model's vocabulary (0..{model.d_vocab - 1}): "
                              f"the inputs come from another tokenizer ({getattr(inputs, 'prepared_by', None) or 'unknown'}); "
                              "prepare them with this model, model.prepare(image, prompt)")  # fmt: skip


def positions_in(positions, n_positions: int, what: str = "positions") -> None:
    """Refuse positions outside a sequence of ``n_positions`` (negative indices count from the end)."""
    import torch

    positions = torch.as_tensor(positions).reshape(-1)
    bad = [int(p) for p in positions if not -n_positions <= int(p) < n_positions]
    if bad:
        from vlm_lens.errors import OutOfRangeError

        raise OutOfRangeError(f"{what} {bad[:5]} are outside the sequence of {n_positions} positions (0..{n_positions - 1})")


HookFn = Callable[..., Any]


def return_type(value: Any) -> None:
    """``run_with_hooks(return_type=...)``: ``"logits"`` or None, as in TransformerLens; ``"loss"`` needs labels a
    prompt-and-image forward does not have."""
    if value not in ("logits", None):
        raise InputError(f"return_type must be 'logits' or None, got {value!r}; for a loss, take the log-softmax of the "
                         "logits at the positions you score")  # fmt: skip


class NamedHook:
    """The hook point a hook function receives, named as the hook was registered: a TransformerLens alias such as
    ``blocks.6.hook_mlp_out`` resolves to the bridge's ``blocks.6.mlp.hook_out``, and a name check inside the hook
    (``if hook.name == "blocks.6.hook_mlp_out"``) must still match. Everything else is the hook point's own."""

    def __init__(self, hook: Any, name: str):
        self._hook, self.name = hook, name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._hook, attribute)

    def __repr__(self) -> str:
        return f"NamedHook({self.name!r} -> {self._hook!r})"


def shape_checked(name, fn: HookFn) -> HookFn:
    """``fn`` with its output checked: a hook may return None (keep the activation) or a tensor of the activation's
    shape; anything else would silently change every later shape (a wrong batch size, a wrong width)."""

    label = name if isinstance(name, str) else None

    def hook(activation, hook=None):
        if label is not None and hook is not None and getattr(hook, "name", label) != label:
            hook = NamedHook(hook, label)
        out = fn(activation, hook)
        if out is not None and isinstance(activation, Tensor):
            if not isinstance(out, Tensor):
                raise ShapeError(f"hook on {label or getattr(hook, 'name', '?')!r} returned {type(out).__name__}; return None "
                                 "(keep the activation) or a tensor of the same shape")  # fmt: skip
            if out.shape != activation.shape:
                raise ShapeError(f"hook on {label or getattr(hook, 'name', '?')!r} returned shape {tuple(out.shape)} for an "
                                 f"activation of shape {tuple(activation.shape)}; return a tensor of the same shape "
                                 "(edit it in place or index-assign into a copy)")  # fmt: skip
        return out

    return hook
