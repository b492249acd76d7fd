"""The report: ``report.html`` (self-contained, offline) and ``report.json``.

- :mod:`~.build`: the report of a run, from its store; :mod:`~.sections`: what goes where;
- :mod:`~.charts`: one plotly figure per chart; :mod:`~.page`: the HTML page and the atomic write of the pair;
- :mod:`~.png_export`: PNG files of the figures in an isolated child process.

May import :mod:`vlm_lens`, :mod:`vlm_lens.probes`, ``analysis`` and ``runs``; never ``cli``.
"""


def __getattr__(name: str):
    """``vlm_lens.experiments.report`` was the page module before 0.2: its public names still resolve, deprecated."""
    import importlib
    import warnings

    if name.startswith("_") or name in ("build", "charts", "page", "png_export", "sections"):  # submodules import
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    page = importlib.import_module(f"{__name__}.page")
    if not hasattr(page, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"vlm_lens.experiments.report.{name} moved to vlm_lens.experiments.report.page.{name}; the old path "
                  "goes in the next release", DeprecationWarning, stacklevel=2)  # fmt: skip
    return getattr(page, name)
