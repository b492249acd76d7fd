"""The report of a run, drawn from its store: ``report.html`` / ``report.json`` with per-sample detail for the first
``detail`` samples (the aggregates come from :mod:`vlm_lens.experiments.runs.store_analysis`)."""

from __future__ import annotations

import json
from pathlib import Path

from vlm_lens.errors import InputError
from vlm_lens.experiments.analysis import knowledge_evolution as ke
from vlm_lens.experiments.report import page as R
from vlm_lens.experiments.report.sections import sections as draw_sections
from vlm_lens.experiments.runs.store import Store
from vlm_lens.experiments.runs.store_analysis import (
    DETAIL_SAMPLES,
    aggregate,
    config_of,
    feature_clusters,
    model_info,
    samples,  # fmt: skip
    skip_tables,
)


def build(store: str | Path | Store, out_dir: str | Path, *, variant: str | None = None, png: bool = True,
          tsne_iter: int = 1000, show_special: bool = False, detail: int = DETAIL_SAMPLES, progress=None) -> dict:  # fmt: skip
    """Compute every aggregate from ``store`` and write ``report.html`` / ``report.json`` into ``out_dir``."""
    store = store if isinstance(store, Store) else Store(store)
    report = progress or (lambda *a: None)
    report("reading the store", 0, 1)
    config = config_of(store)
    variant = variant or store.meta["settings"]["variant"]
    if variant not in config.variants:
        raise InputError(f"variant {variant!r} was not analysed in this store; it has {config.variants}")
    model = model_info(store)
    agg = aggregate(store)
    sample_frame = store.frame("samples", ["index", "status", "error", "where", "planted", "hallucination"])
    if not (sample_frame["status"] == "ok").any():
        raise InputError(f"{store.path} holds no analysed sample yet: run the analysis (with --resume) first")
    detailed = samples(store, ids=list(sample_frame.loc[sample_frame["status"] == "ok", "sample_id"][:detail]))
    data = {"config": store.meta["settings"]["evolution"], "aggregate": agg, "model": store.meta["model"],
            "shown_variant": variant, "shown_special": show_special,
            "samples": [ke.sample_json(s) for s in detailed],
            "store": {"path": str(store.path), "samples": int(len(sample_frame)),
                      "analysed": int((sample_frame["status"] == "ok").sum()), "detail_samples": len(detailed),
                      "planted": int(sample_frame.loc[sample_frame["status"] == "ok", "planted"].sum()),
                      "bad": [{"sample": r.sample_id, "where": r.where, "error": r.error}
                              for r in sample_frame.itertuples() if r.status == "bad"],
                      "source": store.meta["source"]}}  # fmt: skip
    data["layer_skip"] = skip_tables(store, agg)
    report("reading the store", 1, 1)
    report("feature clusters", 0, 1)
    data["feature_clusters"] = feature_clusters(store, agg, variant, tsne_iter)
    report("feature clusters", 1, 1)
    data["patch_maps"] = {s.name: s.patch_map for s in detailed if s.patch_map}  # the image-token lens maps drawn
    data["hallucination"] = []
    for r in sample_frame.itertuples():
        found = json.loads(r.hallucination).get(variant) if isinstance(r.hallucination, str) else None
        if found:
            data["hallucination"].append({"sample": r.sample_id, "planted_prior": bool(r.planted), **found})
    if store.meta["settings"].get("tuned_lens"):
        data["tuned_lens"] = store.meta["settings"]["tuned_lens"]
    stages = agg[variant]["stages"]
    report("writing the report", 0, 1)
    drawn = draw_sections(model, detailed, data, variant, stages, show_special)
    written = R.write_report(Path(out_dir), f"Knowledge evolution · {model.name}", drawn, data, png=False)
    report("writing the report", 1, 1)
    if png:
        report("PNG export", 0, 1)
        written["png"], written["png_notice"] = R.export_pngs(Path(out_dir), R.figures_of(drawn))
        written["png"] = written["png"] or []
        report("PNG export", 1, 1)
    return {"data": data, "files": written}
