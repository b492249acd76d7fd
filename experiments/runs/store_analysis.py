"""What a store holds, read back and aggregated (no model needed): 10 samples and 10,000 take this path.

- the knowledge-evolution aggregate (:func:`knowledge_evolution.aggregate`) over every committed sample's evidence;
- the layer-skip tables: mean effects per skipped set (phase 2) and per single layer (the sweep);
- feature clusters: the mean pairwise cosine per layer streamed over *all* answer states
  (:func:`feature_clusters.mean_pairwise_cosine`), t-SNE and silhouettes on the first ``max_images`` images;
- :func:`frames`: every table as pandas frames (the store holds every sample's numbers).

The report drawn from these is :func:`vlm_lens.experiments.report.build.build`.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from vlm_lens.experiments.analysis import evidence as ev
from vlm_lens.experiments.analysis import feature_clusters as fc
from vlm_lens.experiments.analysis import knowledge_evolution as ke
from vlm_lens.experiments.analysis import layer_skip
from vlm_lens.experiments.runs import reduce as rd
from vlm_lens.experiments.runs.store import Store

DETAIL_SAMPLES = 100  # samples with per-token detail in report.json and the report's per-token table
MAX_TSNE_IMAGES = 200  # images in the across-images t-SNE and silhouettes (the mean cosine uses them all)
_EVIDENCE = ["variant", "step", *rd.TOKEN_FIELDS, "js_adjacent"]
_SAMPLE = ["index", "question", "prompt", "generated_text", "answer", "correct", "planted", "image_path", "n_steps",
           "generated_tokens", "hallucination", "status", "error", "where"]  # fmt: skip


def config_of(store: Store) -> ke.EvolutionConfig:
    raw = store.meta["settings"]["evolution"]
    return ke.EvolutionConfig(detection=ev.DetectionConfig(**raw["detection"]), variants=tuple(raw["variants"]),
                              max_new_tokens=raw["max_new_tokens"], include_special=raw["include_special"])  # fmt: skip


def model_info(store: Store) -> SimpleNamespace:
    """What the report needs of the model: identity from run.json, token strings from vocab.json."""
    meta = store.meta["model"]
    try:
        vocab = rd.Vocabulary(json.loads((store.path / "vocab.json").read_text()))
    except (OSError, ValueError) as error:
        from vlm_lens.experiments.runs.store import StoreError

        raise StoreError(f"{store.path / 'vocab.json'} is missing or damaged ({type(error).__name__}); rerun the "
                         "analysis with --resume (it rewrites the vocabulary, then the report)") from None
    return SimpleNamespace(name=meta["name"], family=meta["family"], n_layers=meta["n_layers"], d_model=meta["d_model"],
                           tokenizer=vocab)  # fmt: skip


def frames(store: str | Path | Store) -> dict:
    """Every table of a store as pandas frames (committed rows, one copy per sample, dataset order)."""
    store = store if isinstance(store, Store) else Store(store)
    return {table: store.frame(table) for table in ("samples", "tokens", "states", "single", "skip")}


def samples(store: Store, ids=None, arrays: bool = True) -> list[rd.StoredSample]:
    """Good samples (``ids``: only these) as :class:`~vlm_lens.experiments.runs.reduce.StoredSample`."""
    sample_frame = store.frame("samples", _SAMPLE + (["thumbnail", "patch_map"] if arrays else []), samples=ids)
    sample_frame = sample_frame[sample_frame["status"] == "ok"]
    extra = ["prob", "topk_ids", "topk_prob", "curve_ids", "curve_prob"] if arrays else []
    tokens = store.frame("tokens", _EVIDENCE + extra, samples=list(sample_frame["sample_id"]))
    return rd.stored_samples(sample_frame, tokens, store.meta["model"]["n_layers"], arrays=arrays)


def aggregate(store: Store) -> dict:
    config = config_of(store)
    return ke.aggregate(samples(store, arrays=False), store.meta["model"]["n_layers"], config.include_special,
                        config.detection)  # fmt: skip


def skip_sets(store: Store, agg: dict) -> dict[str, list[int]] | None:
    """The named skip sets (``none``, skip.1/2/3) from the stages of the run's variant, or None (no stages)."""
    stages = agg[store.meta["settings"]["variant"]]["stages"]
    n = store.meta["model"]["n_layers"]
    if stages is None or stages["critical_layer"] >= n:
        return None
    return {"none": [], **layer_skip.skip_sets(stages["critical_layer"], stages["mutation_layer"], n)}


def skip_tables(store: Store, agg: dict) -> dict | None:
    sets = skip_sets(store, agg)
    frame = store.frame("skip")
    if sets is None or not len(frame):
        return None
    out: dict[str, Any] = {"critical_layer": None, "mutation_layer": None, "sets": {}, "sweep": {}}
    stages = agg[store.meta["settings"]["variant"]]["stages"]
    out["critical_layer"], out["mutation_layer"] = stages["critical_layer"], stages["mutation_layer"]
    planted = set(store.frame("samples", ["planted"]).query("planted")["sample_id"])
    for name, rows in frame.groupby("set", sort=False):
        rows = rows.to_dict("records")
        for r in rows:
            r["correct"] = None if r["correct"] is None or r["correct"] != r["correct"] else bool(r["correct"])
        mean = layer_skip.mean_skip_rows(rows, [int(x) for x in rows[0]["skipped_layers"]])
        mean["texts"] = mean["texts"][:DETAIL_SAMPLES]
        # the planted prior's counter-prior questions answered right with these layers skipped (the repair)
        on_planted = [r["correct"] for r in rows if r["sample_id"] in planted and r["correct"] is not None]
        mean["planted_restored"] = {"restored": sum(on_planted), "of": len(on_planted)} if on_planted else None
        (out["sets"] if name in sets else out["sweep"])[name] = mean
    out["sets"] = {k: out["sets"][k] for k in sets if k in out["sets"]}
    out["sweep"] = dict(sorted(out["sweep"].items(), key=lambda kv: int(kv[0])))
    return out


def feature_clusters(store: Store, agg: dict, variant: str, max_iter: int, max_images: int = MAX_TSNE_IMAGES) -> dict:
    n = store.meta["model"]["n_layers"]
    stages = agg[store.meta["settings"]["variant"]]["stages"]
    crit = stages["critical_layer"] if stages else None
    mut = stages["mutation_layer"] if stages else None
    paper = variant == "paper"
    ok = store.frame("samples", ["index", "status", "answer", "generated_text"])
    ok = ok[ok["status"] == "ok"]
    unit_sum, n_images = None, 0
    for batch in store.iter_column_batches("states", ["answer_state", "answer_state_normed"]):
        for state in batch["answer_state"]:  # mean cosine over every image, streamed (raw residual stream)
            x = torch.tensor(state, dtype=torch.float64).reshape(n + 1, -1)
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            unit_sum = x if unit_sum is None else unit_sum + x
            n_images += 1
    first = list(ok["sample_id"][:max_images])
    states = store.frame("states", ["answer_state", "answer_state_normed"], samples=first)
    across = across_normed = None
    if len(states) >= 2:  # raw states; the paper's projection swaps in the normed last layer (from_features)
        across = torch.stack([torch.tensor(s, dtype=torch.float32).reshape(n + 1, -1) for s in states["answer_state"]])
        across_normed = torch.stack([torch.tensor(s, dtype=torch.float32) for s in states["answer_state_normed"]])
    single_frame = store.frame("single")
    single = single_normed = None
    tokens: list[str] = []
    if len(single_frame):
        row = single_frame.iloc[0]
        single = torch.tensor(row["stack"], dtype=torch.float32).reshape(n + 1, int(row["n_tokens"]), -1)
        single_normed = torch.tensor(row["last_normed"], dtype=torch.float32).reshape(int(row["n_tokens"]), -1)
        tokens = list(row["labels"])
    chosen = ok.set_index("sample_id").loc[list(states["sample_id"])] if len(states) else ok.iloc[:0]
    labels = list(chosen["answer"]) if len(chosen) and chosen["answer"].notna().all() else list(chosen["generated_text"])
    mean_cos = fc.mean_pairwise_cosine(unit_sum, n_images) if unit_sum is not None else None
    return fc.from_features(single, tokens, across, list(states["sample_id"]), labels, mean_cos, model_info(store),
                            crit, mut, max_iter=max_iter, variant="paper" if paper else "correct",
                            single_last_normed=single_normed, across_last_normed=across_normed,
                            n_images_total=n_images)  # fmt: skip
