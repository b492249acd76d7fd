"""Deprecated module paths, kept importable for one release.

A package that renamed or moved modules installs a :class:`MovedModules` finder with a map ``old name -> new
module(s)``: ``import package.old`` (and ``from package import old``) then gives the new module itself (the same object,
so monkeypatching either patches both), with a :class:`DeprecationWarning` naming the new path. An old module that was
split maps to several new ones: its old name is then a module holding the public names of all of them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from typing import Mapping, Sequence


def resolve(package: str, targets: Sequence[str], old: str) -> types.ModuleType:
    """The module an old name stands for (a merged module when the old one was split)."""
    modules = [importlib.import_module(f"{package}.{new}") for new in targets]
    if len(modules) == 1:
        return modules[0]
    merged = types.ModuleType(f"{package}.{old}", f"Deprecated: {', '.join(m.__name__ for m in modules)}.")
    for module in modules:
        merged.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("_")})
    return merged


class _Loader(importlib.abc.Loader):
    def __init__(self, package: str, targets: Sequence[str]):
        self.package, self.targets, self.original_spec = package, targets, None

    def create_module(self, spec):
        old = spec.name.rsplit(".", 1)[1]
        new = " + ".join(f"{self.package}.{n}" for n in self.targets)
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in the next release", DeprecationWarning,
                      stacklevel=2)  # fmt: skip
        module = resolve(self.package, self.targets, old)
        self.original_spec = getattr(module, "__spec__", None)
        return module

    def exec_module(self, module) -> None:
        # the target is already executed; the import system stamped the old name's spec on it: give its own back
        if self.original_spec is not None:
            module.__spec__ = self.original_spec


class MovedModules(importlib.abc.MetaPathFinder):
    """Finds ``package.<old>`` for the old names of ``moved`` (old name -> new module paths, relative to ``package``)."""

    def __init__(self, package: str, moved: Mapping[str, Sequence[str]]):
        self.package, self.moved = package, dict(moved)

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, old = fullname.rpartition(".")
        if prefix != self.package or old not in self.moved:
            return None
        return importlib.util.spec_from_loader(fullname, _Loader(self.package, self.moved[old]))


def install(package: str, moved: Mapping[str, Sequence[str]]) -> None:
    """Put a finder for ``package``'s old names on ``sys.meta_path`` (once per package)."""
    if not any(isinstance(f, MovedModules) and f.package == package for f in sys.meta_path):
        sys.meta_path.append(MovedModules(package, moved))
