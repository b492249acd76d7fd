"""Deprecated module paths of the flat ``vlm_lens.experiments`` (before 0.2), kept importable for one release.

``import vlm_lens.experiments.knowledge_evolution`` (and ``from vlm_lens.experiments import store``) still work: the
old name is the new module itself (the same object, so monkeypatching either patches both), imported with a
:class:`DeprecationWarning` naming the new path. ``store_report`` was split: its old name is a module holding the
public names of both halves.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

PACKAGE = "vlm_lens.experiments"
MOVED: dict[str, tuple[str, ...]] = {
    **{m: (f"analysis.{m}",) for m in ("evidence", "confirmation", "knowledge_evolution", "hallucination",
                                       "layer_skip", "feature_clusters", "tuned_lens", "validation",
                                       "suite_validation", "compare")},  # fmt: skip
    **{m: (f"runs.{m}",) for m in ("datasets", "manifest", "reduce", "store", "streaming", "distributed", "identity")},
    "store_report": ("runs.store_analysis", "report.build"),
    "charts": ("report.charts",),
    "sections": ("report.sections",),
    "png_export": ("report.png_export",),
    "cli_analyze": ("cli.analyze",),
    "cli_lens": ("cli.lens",),
    "cli_zoo": ("cli.zoo",),
    "outputs": ("cli.outputs",),
}


def resolve(old: str) -> types.ModuleType:
    """The module an old name stands for (a merged module when the old one was split)."""
    targets = [importlib.import_module(f"{PACKAGE}.{new}") for new in MOVED[old]]
    if len(targets) == 1:
        return targets[0]
    merged = types.ModuleType(f"{PACKAGE}.{old}", f"Deprecated: {', '.join(t.__name__ for t in targets)}.")
    for target in targets:
        merged.__dict__.update({k: v for k, v in vars(target).items() if not k.startswith("_")})
    return merged


class _Loader(importlib.abc.Loader):
    original_spec = None

    def create_module(self, spec):
        old = spec.name.rsplit(".", 1)[1]
        new = " + ".join(f"{PACKAGE}.{n}" for n in MOVED[old])
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in the next release", DeprecationWarning,
                      stacklevel=2)  # fmt: skip
        module = resolve(old)
        self.original_spec = getattr(module, "__spec__", None)
        return module

    def exec_module(self, module) -> None:
        # the target is already executed; the import system stamped the old name's spec on it: give its own back
        if self.original_spec is not None:
            module.__spec__ = self.original_spec


class MovedModules(importlib.abc.MetaPathFinder):
    """Finds ``vlm_lens.experiments.<old name>`` for the names in :data:`MOVED`."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, old = fullname.rpartition(".")
        if prefix != PACKAGE or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Loader())


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules())
