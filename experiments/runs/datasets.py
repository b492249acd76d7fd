"""Sample sources for ``vlm-lens analyze`` (a manifest, a folder of images, a saved HF dataset): sized up front,
re-iterable and lazy (a file is opened only to ``verify()`` it, a HF image decoded, when its row is yielded). A bad row
raises naming the row and the fix; with ``skip_bad=True`` it is yielded with ``error`` set and no image instead."""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from PIL import Image

from vlm_lens.errors import InputError, NotFoundError
from vlm_lens.experiments.runs.sources import (
    IMAGE_SUFFIXES,
    SKIP_HINT,
    BadRow,
    Entry,
    Source,
    check_file,
    digest,
    entries_from,  # fmt: skip
    text_of,
)


def _manifest_records(path: Path, hint: str) -> Iterator[tuple]:
    derived: dict[str, int] = {}
    if path.suffix.lower() not in (".csv", ".jsonl", ".json"):
        raise InputError(f"{path}: a manifest is .jsonl or .csv, got {path.suffix!r}")
    with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a spreadsheet's byte-order mark
        rows: Iterator = ((number, line) for number, line in enumerate(handle, start=1) if line.strip())
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(handle)
            if not {"image", "question"} <= set(fields := reader.fieldnames or []):
                raise InputError(f"{path}: the header must name 'image' and 'question' columns, got {fields or None}")
            rows = ((reader.line_num, row) for row in reader)
        for line, row in rows:
            where = f"{path}:{line}"
            try:
                row = json.loads(row) if isinstance(row, str) else row
            except json.JSONDecodeError as error:
                row = BadRow(f"{where}: not valid JSON ({error.msg}); write one object per line{hint}")
            if not isinstance(row, dict):
                yield where, str(line), None, "", None, row if isinstance(row, BadRow) else BadRow(
                    f"{where}: expected an object with 'image' and 'question', got {type(row).__name__}; "
                    f"write one JSON object per line{hint}")  # fmt: skip
                continue
            question, key = str(row.get("question") or ""), text_of(row.get("id"))
            answer = str(row["answer"]) if text_of(row.get("answer")) else None
            missing = [name for name in ("image", "question") if not text_of(row.get(name))]
            image = path.parent / str(row.get("image") or "")  # an absolute path replaces the folder
            if not key and not missing:
                derived[image.name] = count = derived.get(image.name, 0) + 1
                key = image.name if count == 1 else f"{image.name}#{count}"
            bad = BadRow(f"{where}: missing {', '.join(missing)}; every row needs 'image' and 'question': fill them in"
                       f"{hint}") if missing else None  # fmt: skip
            yield where, str(line), key, question, answer, bad or image


def from_manifest(path: str | Path, *, skip_bad: bool = False, _hint: str = SKIP_HINT) -> Source:
    """A ``.jsonl`` (one object per line) or ``.csv`` (header row) manifest: ``image``, ``question``, optional
    ``answer`` and ``id`` (default: the image's file name). Relative image paths resolve against its folder."""
    path, origin = Path(path), " (relative paths resolve against the manifest's folder)"
    if not path.is_file():
        raise NotFoundError(f"manifest not found: {path}")
    resolve = functools.partial(check_file, origin=origin, hint=_hint)
    entries = functools.partial(entries_from, functools.partial(_manifest_records, path, _hint), resolve, skip_bad, "line")
    length = sum(1 for _ in entries(check=False))  # the structure and ids now; images as their rows are yielded
    if not length:
        raise InputError(f"{path} lists no samples; add one row per (image, question)")
    digest = lambda: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    return Source(f"manifest {path} ({length} rows)", length, entries, digest)


def from_folder(path: str | Path, prompt: str | None, *, answers: Mapping[str, str] | None = None,
                skip_bad: bool = False) -> Source:  # fmt: skip
    """Every image file under ``path`` (recursively, hidden files and folders skipped) in sorted relative-path order,
    each asked ``prompt``; ``answers`` maps a relative path (or a file name) to its reference answer."""
    root, answers = Path(path), dict(answers or {})
    if not root.is_dir():
        raise NotFoundError(f"image folder not found: {root} (a single file: use --image FILE, a list: --manifest)")
    if not text_of(prompt):
        raise InputError(f"{root}: a folder of images needs the question to ask of every image: pass --prompt TEXT")
    files = sorted(rel.as_posix() for rel in (p.relative_to(root) for p in root.rglob("*"))
                   if rel.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in rel.parts)
                   and (root / rel).is_file())  # fmt: skip
    if not files:
        raise InputError(f"{root}: no image files ({' '.join(sorted(IMAGE_SUFFIXES))}) under this folder; "
                         "point --image at a folder of images or list them in a --manifest")  # fmt: skip

    def records() -> Iterator[tuple]:
        for rel in files:
            yield str(root / rel), rel, rel, prompt, answers.get(rel, answers.get(Path(rel).name)), root / rel

    resolve = functools.partial(check_file, origin="", hint=SKIP_HINT)
    sizes = lambda: [(rel, (root / rel).stat().st_size) for rel in files]  # noqa: E731
    fingerprint = lambda: digest(sizes(), prompt, sorted(answers.items()))  # noqa: E731
    entries = functools.partial(entries_from, records, resolve, skip_bad, "file")
    return Source(f"folder {root} ({len(files)} images)", len(files), entries, fingerprint)


def _answer(value: Any, feature: Any) -> str | None:
    if isinstance(value, (list, tuple)):
        return _answer(value[0], getattr(feature, "feature", None)) if value else None
    if isinstance(value, int) and hasattr(feature, "int2str"):  # a ClassLabel; -1 is "no label"
        return feature.int2str(value) if value >= 0 else None
    return None if value is None or str(value).strip() == "" else str(value)


def _decode(value: Any, where: str, root: Path, column: str) -> Any:
    if isinstance(value, dict) and value.get("bytes"):
        try:
            (image := Image.open(io.BytesIO(value["bytes"]))).load()
            return image
        except Exception as error:
            raise BadRow(f"{where}: unreadable image bytes ({type(error).__name__}: {error}); fix the row{SKIP_HINT}") from None
    value = value.get("path") if isinstance(value, dict) else value
    if not text_of(value):
        raise BadRow(f"{where}: no image in column {column!r}; fill it in{SKIP_HINT}")
    return check_file(root / str(value), where, " (relative paths resolve against the dataset's folder)", SKIP_HINT)


def from_hf_dataset(path: str | Path, *, image_column: str | None = None, question_column: str | None = None,
                    answer_column: str | None = None, id_column: str | None = None, prompt: str | None = None,
                    split: str | None = None, skip_bad: bool = False) -> Source:  # fmt: skip
    """A folder written by ``Dataset.save_to_disk`` (or a ``DatasetDict``'s: ``split`` picks one). The Arrow data is
    memory-mapped; a row's image is decoded only when it is yielded. ``prompt`` is the question of every row."""
    import datasets

    root = Path(path)
    from vlm_lens.offline import offline

    try:
        with offline():
            ds, state = datasets.load_from_disk(str(root)), root
    except FileNotFoundError as error:
        raise NotFoundError(f"{root} is not a dataset folder written by save_to_disk ({error}); "
                                "for image files use --image or --manifest") from None  # fmt: skip
    if isinstance(ds, dict):  # a DatasetDict
        splits, split = list(ds), split if split is not None or len(ds) > 1 else next(iter(ds))
        if split is None or split not in ds:
            which = "holds several splits" if split is None else f"has no split {split!r}"
            raise InputError(f"{root} {which}: {', '.join(splits)}; pass --split NAME")
        ds, state = ds[split], root / split
    elif split is not None and split != str(ds.split):
        raise InputError(f"{root} is one dataset (split {ds.split}), not a DatasetDict: drop --split {split}")
    features, names = ds.features, list(ds.column_names)
    label = f"dataset {root}" + (f" split {split}" if split else "")

    def pick(given: str | None, option: str, defaults: Sequence[str]) -> str | None:
        if given is not None and given not in names:
            raise InputError(f"{label}: no column {given!r} ({option}); the dataset's columns: {', '.join(names)}")
        return given if given is not None else next((c for c in defaults if c in names), None)

    typed = [c for c in names if isinstance(features[c], datasets.Image)]
    image_col = pick(image_column, "--image-column", typed + ["image", "img", "image_path", "file_name"])
    if image_col is None:
        raise InputError(f"{label}: no image column (no datasets.Image feature, none of image/img/image_path/"
                         f"file_name); its columns: {', '.join(names)}; pass --image-column NAME")  # fmt: skip
    questions = ("question", "prompt", "query", "text")
    question_col = None if prompt else pick(question_column, "--question-column", questions)
    if question_col is None and not prompt:
        raise InputError(f"{label}: no question column (none of question/prompt/query/text); its columns: "
                         f"{', '.join(names)}; pass --question-column NAME or --prompt TEXT")  # fmt: skip
    answer_col = pick(answer_column, "--answer-column", ("answer", "answers", "label"))
    id_col = pick(id_column, "--id-column", ("id",))
    if not len(ds):
        raise InputError(f"{label} has no rows; save a dataset with at least one (image, question) row")
    view = ds.select_columns(list(dict.fromkeys(c for c in (image_col, question_col, answer_col, id_col) if c)))
    if isinstance(features[image_col], datasets.Image):
        view = view.cast_column(image_col, datasets.Image(decode=False))  # a features swap: raw bytes, decoded below

    def records(columns: list[str]) -> Iterator[tuple]:
        batches = view.select_columns(columns).iter(32)
        for i, row in enumerate(dict(zip(batch, values)) for batch in batches for values in zip(*batch.values())):
            where, question = f"{label} row {i}", prompt or str(row.get(question_col) or "")
            answer = _answer(row[answer_col], features[answer_col]) if answer_col in row else None
            image = row.get(image_col) if question.strip() or columns == [id_col] else BadRow(
                f"{where}: empty question in column {question_col!r}; fill it in or pass --prompt TEXT{SKIP_HINT}")
            yield where, str(i), text_of(row.get(id_col)), question, answer, image

    resolve = functools.partial(_decode, root=root, column=image_col)
    if id_col and not skip_bad:  # unique ids now (one small column), before any model loads
        sum(1 for _ in entries_from(functools.partial(records, [id_col]), resolve, False, "row", check=False))

    def fingerprint() -> str:
        saved = state / "state.json"
        content = json.loads(saved.read_text()).get("_fingerprint") if saved.is_file() else None
        files = [(Path(f["filename"]).name, Path(f["filename"]).stat().st_size) for f in ds.cache_files]
        return digest(content or files, split, image_col, question_col, answer_col, id_col, prompt)

    entries = functools.partial(entries_from, functools.partial(records, view.column_names), resolve, skip_bad, "row")
    return Source(f"{label} ({len(ds)} rows)", len(ds), entries, fingerprint)


def from_samples(samples: Sequence[Any]) -> Source:
    """``knowledge_evolution.Sample`` objects as a source; a repeated name gets ``#2``, ``#3`` ... (unique ids)."""
    entries: list[Entry] = []
    counts: dict[str, int] = {}  # how often each name was seen
    for index, s in enumerate(samples):
        counts[base] = count = counts.get(base := s.name or str(index), 0) + 1
        key, image = base if count == 1 else f"{base}#{count}", str(s.image) if isinstance(s.image, Path) else s.image
        entries.append(Entry(index, key, image, s.prompt, s.answer, f"sample {key}", planted=bool(s.planted)))
    if not entries:
        raise InputError("no samples given; pass --manifest, --image or --dataset")

    def fingerprint() -> str:  # an in-memory image by its mode, size and pixels
        image = lambda im: hashlib.sha256(f"{im.mode}{im.size}".encode() + im.tobytes()).hexdigest()  # noqa: E731
        pictures = [image(e.image) if isinstance(e.image, Image.Image) else str(e.image) for e in entries]
        return digest([(e.id, e.question, e.answer, e.planted) for e in entries], pictures)

    return Source(f"{len(entries)} samples", len(entries), lambda: iter(entries), fingerprint)


def open_source(*, manifest: str | Path | None = None, images: str | Path | None = None,
                dataset: str | Path | None = None, prompt: str | None = None, skip_bad: bool = False,
                **columns: str | None) -> Source:  # fmt: skip
    """The source of exactly one of ``manifest``, ``images`` (a folder) or ``dataset`` (a saved HF dataset);
    ``columns`` (image_column, question_column, answer_column, id_column, split) apply to a dataset."""
    given = [f"--{name}" for name, value in (("manifest", manifest), ("image", images), ("dataset", dataset))
             if value is not None]  # fmt: skip
    if len(given) != 1:
        raise InputError(f"give exactly one of --manifest FILE, --image DIR or --dataset DIR, got "
                         f"{' and '.join(given) if given else 'none'}")  # fmt: skip
    if (chosen := {name: value for name, value in columns.items() if value is not None}) and dataset is None:
        raise InputError(f"{', '.join('--' + c.replace('_', '-') for c in chosen)} apply to --dataset only: drop them")
    if manifest is not None:
        if prompt is not None:
            raise InputError("--prompt asks every --image/--dataset row one question; a manifest has its own: drop it")
        return from_manifest(manifest, skip_bad=skip_bad)
    if images is not None:
        return from_folder(images, prompt, skip_bad=skip_bad)
    assert dataset is not None  # exactly one of the three was given (checked above)
    return from_hf_dataset(dataset, prompt=prompt, skip_bad=skip_bad, **chosen)
