"""Streaming a dataset through the model into a store: trace -> reduce -> write -> release, one batch at a time.

Phase 1 (per sample, batched generation): the traced generation, the per-sample analysis every entry point shares
(:func:`vlm_lens.experiments.analysis.knowledge_evolution.analyze_sample`: the evidence for every lens variant and
the hallucination curves), the answer-position states and (with the sweep) every single-layer skip — all
reduced to rows (:mod:`vlm_lens.experiments.runs.reduce`) and written as one shard per batch. Nothing of a sample stays
in memory after its shard is written, so memory is flat in the number of samples.

Phase 2 (after phase 1, because the skip sets come from the stages of the whole run): skip.1/2/3 on each sample,
one shard per batch. Both phases skip what the store already holds, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

from vlm_lens.experiments.analysis import knowledge_evolution as ke
from vlm_lens.experiments.analysis.references import References
from vlm_lens.experiments.runs import reduce as rd
from vlm_lens.experiments.runs.identity import fingerprint, model_identity
from vlm_lens.experiments.runs.store import Store
from vlm_lens.shared_prefix import PrefixCache

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class StreamSettings:
    """What changes the stored numbers (a resumed run must use the same): the analysis config, the shown variant
    (it picks the stages the skip sets come from), whether the single-layer sweep runs, and the tuned lens."""

    config: ke.EvolutionConfig = ke.EvolutionConfig()
    variant: str = "correct"
    skip_sweep: bool = True
    skip_bad: bool = False
    patch_maps: int = 6  # the first samples keep their image-token lens map (reduce.patch_map) for the report

    def to_json(self, tuned_lens=None) -> dict:
        lens = None
        if tuned_lens is not None:
            weights = [round(float(p.detach().double().sum()), 6) for p in tuned_lens.parameters()]
            lens = {**tuned_lens.describe(), "fingerprint": fingerprint(tuned_lens.describe(), weights)}
        return json.loads(json.dumps({"evolution": asdict(self.config), "variant": self.variant,
                                      "skip_sweep": self.skip_sweep, "patch_maps": self.patch_maps,
                                      "tuned_lens": lens}))  # fmt: skip


def open_store(path, model, source, settings: StreamSettings, *, tuned_lens=None, resume=False, overwrite=False) -> Store:
    """Create (or, with ``resume``, reopen and check) the store of this model, settings and source."""
    from vlm_lens.atomic import write_file
    from vlm_lens.zoo import planted

    identity = {**model_identity(model), "planted_prior": planted.planted_info_for(model)}
    store = Store.create(path, identity, settings.to_json(tuned_lens),
                         {"description": source.description, "fingerprint": source.fingerprint, "n": len(source)},
                         resume=resume, overwrite=overwrite)  # fmt: skip
    vocab = store.path / "vocab.json"
    if not vocab.exists():  # token strings for reports rebuilt without the model
        tokens = model.tokenizer.convert_ids_to_tokens(list(range(model.d_vocab)))
        write_file(vocab, json.dumps([t if t is not None else "" for t in tokens]))
    return store


def release_memory() -> None:
    """Hand freed heap back to the OS after a batch: glibc keeps freed trace buffers in fragmented arenas (measured on
    the medium model: RSS wandering 2.2-2.7 GB between samples, 2.0 GB after ``malloc_trim``). Linux/glibc only."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Within the block, the objects alive when it starts (the model, the loaded libraries) are left out of garbage
    collections (``gc.freeze``): the per-batch :func:`release_memory` then scans only what the run allocated (a full
    collection over the loaded libraries cost 0.22 s per batch on the embedded model, a fifth of its compute).
    Unfrozen on exit, raise or not, so nothing stays uncollectable; a heap someone else froze is left as it is."""
    import gc

    mine = gc.get_freeze_count() == 0
    if mine:
        gc.freeze()
    try:
        yield
    finally:
        if mine:
            gc.unfreeze()


def _batches(entries: Iterable, size: int):
    batch = []
    for entry in entries:
        batch.append(entry)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _prepared(model, batch, skip_bad: bool, bad_rows: list) -> list:
    """(entry, inputs) for the good entries of ``batch``; bad ones become rows (``skip_bad``) or raise naming the row."""
    good = []
    for entry in batch:
        if entry.error is not None:
            bad_rows.append(rd.sample_row(entry, None, error=entry.error))
            continue
        try:
            good.append((entry, model.prepare(entry.image, entry.question)))
        except (ValueError, FileNotFoundError, OSError, TypeError) as error:
            if not skip_bad:
                raise type(error)(f"{entry.where}: {error}; fix the row or pass --skip-bad to skip and record it") from error
            bad_rows.append(rd.sample_row(entry, None, error=str(error)))
    return good


def phase1(model, source, store: Store, settings: StreamSettings, *, tuned_lens=None, batch_size: int = 1,
           writer: str = "main", only: set[str] | None = None, progress: Progress | None = None,
           share_prefixes: bool = True, references: References | None = None) -> int:  # fmt: skip
    """Trace, analyse and reduce every entry of ``source`` not yet in ``store`` (``only``: just these ids);
    returns the number of samples written. ``share_prefixes``: questions about one image, in a batch or in
    consecutive batches, run its prefill once (:mod:`vlm_lens.shared_prefix`; same traces within float tolerance).
    ``references``: the image-swap test's pictures (default: :func:`run_references` of ``source``)."""
    done = store.done_ids(1)
    report = progress or (lambda *a: None)
    if only is not None:  # a worker's share of the samples
        mine = [e for e in source if e.id in only and e.id not in done]
        pending: Iterable = mine
        total, count = len(mine), 0
    else:
        pending, total, count = (e for e in source if e.id not in done), len(source), len(done)
    report("tracing", count, total)
    prefixes = PrefixCache() if share_prefixes else None  # the last image's prefill, kept for the next batches
    if references is None:  # a worker is handed its chunk: the driver passes the whole source's pool
        references = run_references(source, settings)
    with frozen_heap():
        count = _trace_batches(model, pending, store, settings, tuned_lens, batch_size, writer, count, total, report,
                               prefixes, references)  # fmt: skip
    return count


def run_references(source, settings: StreamSettings) -> References:
    """The image-swap test's pictures for a run over ``source``: its first distinct images, the same for every
    sample, batch, resumed run and worker."""
    return References.from_images((e.image for e in source if e.error is None), settings.config.detection.references)


def _trace_batches(model, pending, store: Store, settings: StreamSettings, tuned_lens, batch_size: int, writer: str,
                   count: int, total: int, report, prefixes: PrefixCache | None, references=None) -> int:  # fmt: skip
    config = settings.config
    for batch in _batches(pending, batch_size):
        tables: dict[str, list] = {"samples": [], "tokens": [], "states": [], "single": [], "skip": []}
        good = _prepared(model, batch, settings.skip_bad, tables["samples"])
        traces = ke.trace_samples(model, [inputs for _, inputs in good], config.max_new_tokens, prefixes)
        for (entry, _), trace in zip(good, traces):
            evolution = ke.analyze_sample(trace, entry.id, entry.answer, config, tuned_lens=tuned_lens,
                                          planted=entry.planted, question=entry.question, index=entry.index,
                                          image=entry.image, references=references)  # fmt: skip
            tables["samples"].append(rd.sample_row(entry, evolution, patch_maps=settings.patch_maps))
            tables["tokens"] += rd.token_rows(entry.id, evolution, model.tokenizer)
            state, single = rd.state_rows(entry.id, trace, entry.index)
            tables["states"].append(state)
            tables["single"] += [single] if single is not None else []
            if settings.skip_sweep:
                tables["skip"] += rd.sweep_rows(entry.id, trace, entry.answer)
            del evolution
        del traces, good
        store.write_shard(writer, tables)
        del tables
        release_memory()
        count += len(batch)
        report("tracing", count, total)
    return count


def skip_pending(store: Store) -> set[str]:
    """Ids of the good samples that have no phase-2 (skip-set) rows yet."""
    frame = store.frame("samples", ["status"])
    return set(frame.loc[frame["status"] == "ok", "sample_id"]) - store.done_ids(2)


def phase2(model, source, store: Store, sets: dict[str, list[int]], *, batch_size: int = 1, writer: str = "main",
           only: set[str] | None = None, progress: Progress | None = None, share_prefixes: bool = True) -> int:  # fmt: skip
    """Skip ``sets`` (name -> decoder layers) on every good sample without phase-2 rows; returns samples done."""
    wanted = {i for i in skip_pending(store) if only is None or i in only}
    todo = (e for e in source if e.id in wanted)  # lazy: a dataset's entries may hold decoded images
    report, count = progress or (lambda *a: None), 0
    report("layer skipping", 0, len(wanted))
    prefixes = PrefixCache() if share_prefixes else None
    max_new_tokens = store.meta["settings"]["evolution"]["max_new_tokens"]
    for batch in _batches(todo, batch_size):
        good = _prepared(model, batch, True, [])
        traces = ke.trace_samples(model, [inputs for _, inputs in good], max_new_tokens, prefixes)
        rows = []
        for (entry, _), trace in zip(good, traces):
            rows += rd.set_rows(entry.id, trace, entry.answer, sets)
        del traces, good
        store.write_shard(writer, {"skip": rows}, phase=2)
        count += len(batch)
        report("layer skipping", count, len(wanted))
    return count
