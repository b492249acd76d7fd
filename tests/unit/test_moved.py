"""The module paths of 0.1 still import for one release: the same module objects, with a DeprecationWarning."""

import importlib
import sys
import warnings

import pytest


def fresh_import(name: str):
    sys.modules.pop(name, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(name)
    return module, [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize("old, new", [
    ("vlm_lens.experiments.knowledge_evolution", "vlm_lens.experiments.analysis.knowledge_evolution"),
    ("vlm_lens.experiments.store", "vlm_lens.experiments.runs.store"),
    ("vlm_lens.experiments.png_export", "vlm_lens.experiments.report.png_export"),
    ("vlm_lens.experiments.cli_analyze", "vlm_lens.experiments.cli.analyze"),
    ("vlm_lens.probes.stream", "vlm_lens.probes.lens_stats"),
    ("vlm_lens.probes.lens", "vlm_lens.probes.lenses"),
])  # fmt: skip
def test_an_old_path_is_the_new_module_with_a_warning(old, new):
    module, messages = fresh_import(old)
    assert module is importlib.import_module(new) and module.__spec__.name == new
    assert any(new in m and "next release" in m for m in messages), messages


def test_the_split_store_report_holds_both_halves_and_report_keeps_its_names():
    module, messages = fresh_import("vlm_lens.experiments.store_report")
    from vlm_lens.experiments.report.build import build
    from vlm_lens.experiments.runs.store_analysis import frames

    assert module.build is build and module.frames is frames and messages
    from vlm_lens.experiments import report
    from vlm_lens.experiments.report import page

    with pytest.warns(DeprecationWarning, match="report.page.write_report"):
        assert report.write_report is page.write_report
    with pytest.raises(AttributeError):
        report.no_such_name  # noqa: B018
