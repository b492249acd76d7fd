"""The run store: a folder of Parquet shards that a dataset run streams into, and reports are computed from.

Layout::

    STORE/run.json                     model identity, run settings, source description (written once, atomically)
    STORE/samples/part-W-SEQ.parquet   one row per sample (the shard's commit marker: written last)
    STORE/tokens/part-W-SEQ.parquet    one row per (sample, lens variant, generated token): the per-token evidence
                                       and per-layer arrays (probability, adjacent JS, top-k, candidate curves)
    STORE/states/part-W-SEQ.parquet    one row per sample: the residual stack at the answer position
    STORE/single/part-W-SEQ.parquet    the first samples' (layer x token) states, for the one-image t-SNE
    STORE/skip/part-W-SEQ.parquet      layer-skip effects per (sample, skipped set); phase-2 parts are ``part-p2-...``

``W`` names the writer (``main``, or a Ray worker), ``SEQ`` counts its shards. Every file is written to a temporary
sibling and renamed into place, so a reader never sees a half-written shard. A phase-1 shard counts only once its
``samples`` part exists (its other parts are written first), so a run killed between the two leaves orphans that
readers ignore and ``resume`` rewrites. Commits are durable: each part is fsynced, and its folder after the rename,
before the next is written; the ``samples`` part records the byte size of every other part of its shard in its
Parquet metadata, and a reader counts a shard as committed only when every part has that size and ends in a Parquet
footer. A shard torn by a power loss (a part empty, truncated or corrupted) is therefore uncommitted, and ``--resume``
redoes its samples. Of a sample id in two committed shards (a retried Ray task) readers keep the first by part name.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Iterable, Sequence

from vlm_lens.atomic import write_file
from vlm_lens.errors import InputError
from vlm_lens.experiments.runs.identity import differences

FORMAT = 1
TABLES = ("samples", "tokens", "states", "single", "skip")


class StoreError(InputError):
    """A store that cannot be used as asked (exists without --resume, made by another model or settings...)."""


PARTS_KEY = b"vlm_lens_parts"  # the samples part's metadata: {table: byte size} of the shard's other parts


def _write_parquet(path: Path, rows: list[dict], parts: dict[str, int] | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    if parts is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), PARTS_KEY: json.dumps(parts).encode()})
    # per-layer arrays are float32 (what the model computed in), not Python's float64: half the disk
    fields = [pa.field(f.name, pa.list_(pa.float32())) if pa.types.is_list(f.type) and pa.types.is_floating(f.type.value_type)
              else f for f in table.schema]  # fmt: skip
    table = table.cast(pa.schema(fields, metadata=table.schema.metadata))
    write_file(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"), durable=True)


def _intact(path: Path, size: int | None = None) -> bool:
    """A part file that has its recorded ``size`` (when given) and ends in a Parquet footer (``PAR1``)."""
    try:
        actual = path.stat().st_size
        if actual < 12 or (size is not None and actual != size):
            return False
        with open(path, "rb") as handle:
            return handle.seek(-4, os.SEEK_END) >= 0 and handle.read(4) == b"PAR1"
    except OSError:
        return False


class Store:
    """A run store at ``path`` (see the module docstring). Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = self.path / "run.json"
        if not meta.is_file():
            raise StoreError(f"{self.path} is not a vlm-lens store (no run.json): pass the --store of a run, or the --out folder holding it")
        try:
            self.meta = json.loads(meta.read_text())
            self.meta["model"], self.meta["settings"], self.meta["source"]  # noqa: B018 - the keys a store needs
        except (ValueError, KeyError, TypeError) as error:
            raise StoreError(f"{meta} is damaged ({type(error).__name__}: {error}); the store cannot be trusted: start "
                             "it again with --overwrite") from None
        if self.meta.get("format") != FORMAT:
            raise StoreError(f"{self.path}: store format {self.meta.get('format')} is not {FORMAT}; re-run the analysis")
        self._seq = 0

    # -- creating and resuming ------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, model: dict, settings: dict, source: dict, *, resume: bool = False,
               overwrite: bool = False) -> "Store":  # fmt: skip
        """A store for a run of ``model`` (identity) with ``settings`` over ``source``.

        An existing store is continued with ``resume=True`` only when its model, settings and source fingerprint
        are the ones given (else :class:`StoreError` lists what differs); ``overwrite=True`` starts it afresh; with
        neither, an existing non-empty store is refused."""
        import shutil

        path = Path(path)
        lock = _lock(path)  # one writing run per store: a second one would delete or mix into this one's shards
        meta = {"format": FORMAT, "model": model, "settings": settings, "source": source}
        if (path / "run.json").exists():
            if resume:
                store = cls(path)
                wanted = {"model": model, "settings": settings, "source_fingerprint": source.get("fingerprint")}
                have = {"model": store.meta["model"], "settings": store.meta["settings"],
                        "source_fingerprint": store.meta["source"].get("fingerprint")}  # fmt: skip
                differ = differences(have, json.loads(json.dumps(wanted)))
                if differ:
                    raise StoreError(f"{path} was made by another run and cannot be resumed by this one ("
                                     + "; ".join(differ[:4]) + "): use another --store, or --overwrite to start over")
                store._lock = lock
                return store
            if not overwrite:
                raise StoreError(f"{path} already holds a run: pass --resume to continue it or --overwrite to start over")
            shutil.rmtree(path)
        elif path.exists() and any(path.iterdir()) and not overwrite:
            raise StoreError(f"{path} exists and is not a vlm-lens store: choose an empty or new folder for --store")
        path.mkdir(parents=True, exist_ok=True)
        write_file(path / "run.json", json.dumps(meta, indent=1, sort_keys=True))
        store = cls(path)
        store._lock = lock
        return store

    def close(self) -> None:
        """Release this run's hold on the store (also on garbage collection or process exit)."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.close()  # closing the file drops its flock
            self._lock = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------------------------------------------
    def write_shard(self, writer: str, tables: dict[str, list[dict]], *, phase: int = 1) -> str:
        """Write one shard: every table of ``tables`` as ``TABLE/part-WRITER-SEQ.parquet``. Phase 1: the
        ``samples`` part is written last (the commit). Phase 2 writes only ``skip`` rows, each part complete in
        itself. Returns the part name."""
        unknown = set(tables) - set(TABLES)
        if unknown:
            raise InputError(f"unknown store tables {sorted(unknown)}; tables are {TABLES}")
        part = f"part-{'p2-' if phase == 2 else ''}{writer}-{os.getpid()}-{self._seq:06d}-{uuid.uuid4().hex[:6]}"
        self._seq += 1
        others = [t for t in TABLES if t != "samples" and tables.get(t)]
        sizes = {}
        for table in others:
            _write_parquet(self.path / table / f"{part}.parquet", tables[table])
            sizes[table] = (self.path / table / f"{part}.parquet").stat().st_size
        if "samples" in tables:  # the commit, written last, names what it commits
            _write_parquet(self.path / "samples" / f"{part}.parquet", tables["samples"], parts=sizes)
        return part

    def torn(self) -> list[str]:
        """Shards that started a commit but did not finish it whole (a part missing, truncated or corrupted):
        ``resume`` redoes their samples; reports refuse them."""
        good = self.verified()
        return sorted(p.stem for p in self._parts("samples") if p.stem not in good)

    def verified(self) -> set[str]:
        """Part names whose shard is durably committed: the ``samples`` part is intact and every part it records
        exists with its recorded size and a Parquet footer (phase-2 parts: intact on their own). Checked once per
        state of the store's commit files (a frame read calls it twice; 10,000 shards are 10,000 footers)."""
        import pyarrow.parquet as pq

        commits = self._parts("samples") + [p for p in self._parts("skip") if p.stem.startswith("part-p2-")]
        state = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in commits if p.exists())
        cached = getattr(self, "_verified", None)
        if cached is not None and cached[0] == state:
            return cached[1]
        out = set()
        for file in self._parts("samples"):
            if not _intact(file):
                continue
            try:
                meta = pq.read_schema(file).metadata or {}
            except Exception:  # noqa: BLE001 - an unreadable commit is no commit
                continue
            parts = json.loads(meta.get(PARTS_KEY, b"{}"))
            if all(_intact(self.path / table / f"{file.stem}.parquet", size) for table, size in parts.items()):
                out.add(file.stem)
        out.update(p.stem for p in self._parts("skip") if p.stem.startswith("part-p2-") and _intact(p))
        self._verified = (state, out)
        return out

    # -- reading ----------------------------------------------------------------------------------------------------
    def _parts(self, table: str) -> list[Path]:
        folder = self.path / table
        return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []

    def _read(self, table: str, columns: Sequence[str] | None = None, parts: Iterable[Path] | None = None,
              samples: set[str] | None = None):  # fmt: skip
        """The rows of ``table`` (``columns`` plus ``sample_id``, and ``_part``: the shard), only those of ``samples``
        when given: filtered while reading, so a few samples' heavy arrays are read without the rest."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        wanted = None if columns is None else list(dict.fromkeys(["sample_id", *columns]))
        filters = None if samples is None else [("sample_id", "in", sorted(samples))]
        tables = []
        if parts is None:  # only durably committed shards: a torn part is never read
            good = self.verified()
            parts = [p for p in self._parts(table) if p.stem in good]
        for file in parts:
            try:
                # a column a later version added is absent from older parts: read what the part has (nulls after concat)
                present = None if wanted is None else [c for c in wanted if c in pq.read_schema(file).names]
                t = pq.read_table(file, columns=present, filters=filters) if samples != set() else None
            except Exception as error:  # noqa: BLE001 - a damaged shard (pyarrow raises its own types)
                raise StoreError(f"{file} is unreadable ({type(error).__name__}: {str(error)[:200]}); delete it and run "
                                 "again with --resume to redo its samples") from None
            if t is not None and t.num_rows:
                tables.append(t.append_column("_part", pa.array([file.stem] * t.num_rows, pa.string())))
        return pa.concat_tables(tables, promote_options="default") if tables else None

    def _index(self) -> dict[str, tuple[str, int]]:
        """``{sample_id: (part, dataset index)}`` of every committed sample (the first part holding it)."""
        table = self._read("samples", ["index"])
        out: dict[str, tuple[str, int]] = {}
        if table is not None:
            for sid, part, index in zip(table["sample_id"].to_pylist(), table["_part"].to_pylist(),
                                        table["index"].to_pylist()):  # fmt: skip
                out.setdefault(sid, (part, index))
        return out

    def committed(self) -> dict[str, str]:
        """``{sample_id: part}`` of every committed sample (the first part holding it)."""
        return {sid: part for sid, (part, _) in self._index().items()}

    def done_ids(self, phase: int = 1) -> set[str]:
        """Sample ids whose phase-1 shard is committed, or (``phase=2``) that have phase-2 skip rows."""
        if phase == 1:
            return set(self._index())
        good = self.verified()
        table = self._read("skip", ["sample_id"], [p for p in self._parts("skip") if p.stem.startswith("part-p2-") and p.stem in good])
        return set() if table is None else set(table["sample_id"].to_pylist())

    def frame(self, table: str, columns: Sequence[str] | None = None, samples: Iterable[str] | None = None):
        """``table`` as a pandas DataFrame, committed rows only, one copy of each sample, in dataset order (by
        ``index``, then step/variant where they exist). ``samples`` keeps only those sample ids (read alone)."""
        import pandas as pd

        index = self._index()
        data = self._read(table, columns, samples=None if samples is None else set(samples))
        if data is None:
            return pd.DataFrame(columns=["sample_id", *(columns or [])])
        frame = data.to_pandas()
        committed = frame["sample_id"].map(lambda sid: index.get(sid, (None,))[0]) == frame["_part"]
        if table == "skip":  # phase-2 rows stand alone; phase-1 rows count when their shard committed
            frame = frame[frame["_part"].str.startswith("part-p2-") | committed]
            frame = frame.drop_duplicates(["sample_id", "set"], keep="first")
        else:
            frame = frame[committed]
        frame = frame.assign(_order=frame["sample_id"].map(lambda sid: index[sid][1]))
        keys = ["_order"] + [k for k in ("variant", "step", "set") if k in frame.columns]
        return frame.sort_values(keys, kind="stable").drop(columns=["_part", "_order"]).reset_index(drop=True)

    def iter_column_batches(self, table: str, columns: Sequence[str], batch_rows: int = 256):
        """Committed rows of ``table`` in batches of pandas frames (``columns`` plus ``sample_id``), for reductions
        that must not hold the whole table (mean cosine over 10,000 answer states). Order: by part, not dataset."""
        import pyarrow.parquet as pq

        committed = self.committed()
        seen: set[str] = set()
        good = self.verified()
        for file in [p for p in self._parts(table) if p.stem in good]:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_rows, columns=["sample_id", *columns]):
                frame = batch.to_pandas()
                frame = frame[(frame["sample_id"].map(committed) == file.stem) & ~frame["sample_id"].isin(seen)]
                seen.update(frame["sample_id"])
                if len(frame):
                    yield frame



def _lock(path: Path):
    """An exclusive lock on ``path`` for this process's lifetime (a sibling ``.NAME.lock`` file, outside the store so
    that overwriting the store keeps it), or :class:`StoreError` naming the run that holds it."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path.parent / f".{path.name}.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise StoreError(f"{path} is being written by another run ({holder}): wait for it to finish, or give this "
                         "run another --store (or --out)") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle
