"""Sample sources for ``vlm-lens analyze``: manifests, image folders, saved HF datasets; lazy, sized, row errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from vlm_lens.experiments.analysis.knowledge_evolution import Sample
from vlm_lens.experiments.runs import datasets as D

COLORS = ("red", "green", "blue", "yellow", "white", "black")


def image(path: Path, color: str = "red", fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path, format=fmt)
    return path


def png_bytes(color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, format="PNG")
    return buffer.getvalue()


def jsonl(path: Path, *rows) -> Path:
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return path


@pytest.fixture
def no_image_opens(monkeypatch):
    """PIL.Image.open raises while active: for checking that sizing a source opens no image."""

    def refuse(*args, **kwargs):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(Image, "open", refuse)


# -- manifests --------------------------------------------------------------------------------------------------


def test_jsonl_manifest_relative_absolute_optional_columns(tmp_path):
    a, b = image(tmp_path / "imgs" / "a.png"), image(tmp_path / "elsewhere" / "b.jpg", "blue", "JPEG")
    manifest = jsonl(tmp_path / "m.jsonl", {"image": "imgs/a.png", "question": "what color?", "answer": "red"}, "",
                     {"image": str(b), "question": "and this?", "id": "bee"},
                     {"image": "imgs/a.png", "question": "again?", "answer": ""})  # fmt: skip
    source = D.from_manifest(manifest)
    assert len(source) == 3 and source.description == f"manifest {manifest} (3 rows)"
    entries = list(source)
    assert [e.index for e in entries] == [0, 1, 2]
    assert [e.id for e in entries] == ["a.png", "bee", "a.png#2"]  # the same image asked again stays unique
    assert [e.image for e in entries] == [str(a), str(b), str(a)]
    assert [e.answer for e in entries] == ["red", None, None]
    assert [e.where for e in entries] == [f"{manifest}:1", f"{manifest}:3", f"{manifest}:4"]  # blank line 2 counted
    assert all(e.error is None and not e.planted for e in entries)
    assert list(source) == entries  # re-iterable, same entries


def test_csv_manifest_with_a_byte_order_mark(tmp_path):
    image(tmp_path / "imgs" / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\ufeffid,image,question,answer\nx1,imgs/a.png,what color ?,red\n\n,imgs/a.png,shape ?,\n",
                        encoding="utf-8")  # fmt: skip
    entries = list(D.from_manifest(manifest))
    assert [(e.id, e.question, e.answer, e.where) for e in entries] == [
        ("x1", "what color ?", "red", f"{manifest}:2"),
        ("a.png", "shape ?", None, f"{manifest}:4"),
    ]


BAD_ROWS = [  # (second row, error type, what the message must say)
    ('{"image": "a.png", "question": ', ValueError, ["m.jsonl:2: not valid JSON", "write one object per line"]),
    ("[1, 2]", ValueError, ["m.jsonl:2: expected an object", "got list", "write one JSON object per line"]),
    ({"question": "no image"}, ValueError, ["m.jsonl:2: missing image", "every row needs 'image' and 'question'"]),
    ({"image": "a.png", "question": " "}, ValueError, ["m.jsonl:2: missing question"]),
    ({"image": "nope/b.png", "question": "q"}, FileNotFoundError,
     ["m.jsonl:2: image not found:", "nope/b.png", "resolve against the manifest's folder", "fix the path"]),
    ({"image": "empty.jpg", "question": "q"}, ValueError, ["m.jsonl:2: unreadable image", "empty.jpg", "replace"]),
    ({"image": "text.png", "question": "q"}, ValueError, ["m.jsonl:2: unreadable image", "text.png"]),
    ({"image": "a.png", "question": "q", "id": "a.png"}, ValueError,
     ["m.jsonl:2: id 'a.png' at line 2 repeats line 1; give every row a unique id"]),
]  # fmt: skip


@pytest.mark.parametrize("row, kind, says", BAD_ROWS)
def test_a_bad_row_names_its_line_and_the_fix(tmp_path, row, kind, says):
    image(tmp_path / "a.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image at all")
    manifest = jsonl(tmp_path / "m.jsonl", {"image": "a.png", "question": "q"}, row)
    with pytest.raises(kind) as raised:
        list(D.from_manifest(manifest))
    assert all(fragment in str(raised.value) for fragment in says), str(raised.value)
    assert "--skip-bad" in str(raised.value) or "unique id" in str(raised.value)  # the fix, or the way past it


def test_structure_is_checked_up_front_images_as_rows_are_yielded(tmp_path, no_image_opens):
    manifest = jsonl(tmp_path / "m.jsonl", {"image": "a.png", "question": "q"}, "{broken")
    with pytest.raises(ValueError, match=r"m.jsonl:2: not valid JSON"):
        D.from_manifest(manifest)  # before any iteration (and before any model loads)
    lazy = D.from_manifest(jsonl(tmp_path / "n.jsonl", *({"image": f"{i}.png", "question": "q"} for i in range(4))))
    assert len(lazy) == 4  # counted: no image opened, none exists
    with pytest.raises(FileNotFoundError, match=r"n.jsonl:1: image not found"):
        next(iter(lazy))


def test_skip_bad_yields_error_entries_in_order(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "bad.jpg").write_bytes(b"")
    manifest = jsonl(tmp_path / "m.jsonl", {"image": "a.png", "question": "q", "id": "x"}, "{oops", "",
                     {"image": "gone.png", "question": "q"}, {"image": "a.png", "question": "q2", "id": "x"},
                     {"image": "bad.jpg", "question": "q3", "answer": "no"}, {"question": "q4"},
                     {"image": "a.png", "question": "q5"})  # fmt: skip
    source = D.from_manifest(manifest, skip_bad=True)
    entries = list(source)
    assert len(source) == len(entries) == 7 and [e.index for e in entries] == list(range(7))
    assert [e.error is None for e in entries] == [True, False, False, False, False, False, True]
    assert [e.where for e in entries] == [f"{manifest}:{n}" for n in (1, 2, 4, 5, 6, 7, 8)]
    assert all(e.image is None and e.where in e.error for e in entries if e.error)
    assert "not valid JSON" in entries[1].error and "image not found" in entries[2].error
    assert "id 'x' at line 5 repeats line 1" in entries[3].error and entries[3].id == "x@line-5"
    assert "unreadable image" in entries[4].error and (entries[4].question, entries[4].answer) == ("q3", "no")
    assert "missing image" in entries[5].error
    assert len({e.id for e in entries}) == 7  # still unique, bad rows included
    assert entries[6].image == str(tmp_path / "a.png")


@pytest.mark.parametrize(
    "name, content, says",
    [
        ("m.jsonl", "\n\n", "lists no samples; add one row"),
        ("m.csv", "image,question\n", "lists no samples"),
        ("m.csv", "picture,question\nx.png,q\n", "the header must name 'image' and 'question' columns"),
        ("m.txt", "x", "a manifest is .jsonl or .csv"),
    ],
)
def test_manifest_level_errors(tmp_path, name, content, says):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=says):
        D.from_manifest(tmp_path / name, skip_bad=True)  # not row errors: skip_bad does not apply
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        D.from_manifest(tmp_path / "absent.jsonl")


def test_manifest_fingerprint_follows_the_bytes(tmp_path):
    image(tmp_path / "a.png")
    manifest = jsonl(tmp_path / "m.jsonl", {"image": "a.png", "question": "q"})
    first = D.from_manifest(manifest).fingerprint
    assert len(first) == 64 and D.from_manifest(manifest).fingerprint == first
    jsonl(manifest, {"image": "a.png", "question": "q?"})
    assert D.from_manifest(manifest).fingerprint != first


def test_read_manifest_stays_compatible(tmp_path):
    from vlm_lens.experiments.runs.manifest import read_manifest

    image(tmp_path / "imgs" / "a.png")
    manifest = jsonl(tmp_path / "m.jsonl", {"image": "imgs/a.png", "question": "q", "answer": "red"})
    [sample] = read_manifest(manifest)
    assert isinstance(sample, Sample) and sample.image == tmp_path / "imgs" / "a.png"
    assert (sample.prompt, sample.answer, sample.name) == ("q", "red", "a.png")
    jsonl(manifest, {"image": "imgs/a.png", "question": "q"}, {"question": "no image"})
    with pytest.raises(ValueError, match=r"m.jsonl:2: missing image") as raised:
        read_manifest(manifest)
    assert "--skip-bad" not in str(raised.value)  # tune-lens has no such option
    jsonl(manifest, {"image": "imgs/b.png", "question": "q"})
    with pytest.raises(FileNotFoundError, match=r"m.jsonl:1: image not found"):
        read_manifest(manifest)


# -- folders ----------------------------------------------------------------------------------------------------


def test_folder_recursive_sorted_images_only(tmp_path):
    for rel, color in (("b.png", "red"), ("a/z.JPG", "blue"), ("a/b/c.webp", "green"), ("0.bmp", "white")):
        image(tmp_path / "imgs" / rel, color, {"JPG": "JPEG"}.get(rel.rsplit(".", 1)[-1]))
    (tmp_path / "imgs" / "notes.txt").write_text("no")
    image(tmp_path / "imgs" / ".hidden" / "x.png")
    source = D.from_folder(tmp_path / "imgs", "what color?", answers={"b.png": "red", "c.webp": "green"})
    entries = list(source)
    assert len(source) == 4 and [e.id for e in entries] == ["0.bmp", "a/b/c.webp", "a/z.JPG", "b.png"]
    assert [e.answer for e in entries] == [None, "green", None, "red"]  # by relative path or file name
    assert entries[1].image == entries[1].where == str(tmp_path / "imgs" / "a" / "b" / "c.webp")
    assert {e.question for e in entries} == {"what color?"} and [e.index for e in entries] == [0, 1, 2, 3]


def test_folder_errors_and_skip_bad(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images")
    with pytest.raises(ValueError, match="no image files"):
        D.from_folder(tmp_path / "empty", "q")
    image(tmp_path / "imgs" / "a.png")
    for prompt in (None, "  "):
        with pytest.raises(ValueError, match="--prompt"):
            D.from_folder(tmp_path / "imgs", prompt)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        D.from_folder(tmp_path / "nope", "q")
    (tmp_path / "imgs" / "b.png").write_text("text")
    with pytest.raises(ValueError, match=r"b.png: unreadable image"):
        list(D.from_folder(tmp_path / "imgs", "q"))
    entries = list(D.from_folder(tmp_path / "imgs", "q", skip_bad=True))
    assert [(e.id, e.error is None) for e in entries] == [("a.png", True), ("b.png", False)]


def test_folder_fingerprint(tmp_path):
    image(tmp_path / "a.png")
    first = D.from_folder(tmp_path, "q").fingerprint
    assert D.from_folder(tmp_path, "q").fingerprint == first
    assert D.from_folder(tmp_path, "other q").fingerprint != first
    image(tmp_path / "b.png")
    assert D.from_folder(tmp_path, "q").fingerprint != first


# -- saved HF datasets ------------------------------------------------------------------------------------------


def hf_images(colors, bad: int | None = None) -> list[dict]:
    return [{"bytes": b"not a png" if i == bad else png_bytes(c), "path": None} for i, c in enumerate(colors)]


def save(folder: Path, columns: dict, image_column: str | None = "image", label_names=None, splits=None) -> Path:
    import datasets

    ds = datasets.Dataset.from_dict(columns)
    if image_column:
        ds = ds.cast_column(image_column, datasets.Image())
    if label_names:
        ds = ds.cast_column("label", datasets.ClassLabel(names=label_names))
    (datasets.DatasetDict({s: ds for s in splits}) if splits else ds).save_to_disk(str(folder))
    return folder


def test_hf_dataset_with_embedded_images(tmp_path):
    folder = save(tmp_path / "ds", {"image": hf_images(COLORS[:3]), "question": ["q0", "q1", "q2"],
                                    "label": [0, 1, 0]}, label_names=["yes", "no"])  # fmt: skip
    source = D.from_hf_dataset(folder)
    assert len(source) == 3 and source.description == f"dataset {folder} (3 rows)"
    entries = list(source)
    assert [e.id for e in entries] == ["row-0", "row-1", "row-2"]
    assert [e.answer for e in entries] == ["yes", "no", "yes"]  # a ClassLabel's names
    assert all(isinstance(e.image, Image.Image) for e in entries)
    assert [e.image.getpixel((0, 0)) for e in entries] == [(255, 0, 0), (0, 128, 0), (0, 0, 255)]
    assert [e.where for e in entries] == [f"dataset {folder} row {i}" for i in range(3)]
    assert [e.question for e in entries] == ["q0", "q1", "q2"] and list(source) == entries
    assert [e.question for e in D.from_hf_dataset(folder, prompt="describe")] == ["describe"] * 3


def test_hf_dataset_with_a_path_column_ids_and_answer_lists(tmp_path):
    folder = save(tmp_path / "ds", {"image_path": ["pics/a.png", str(tmp_path / "b.png")], "prompt": ["p0", "p1"],
                                    "answers": [["x", "y"], []], "id": ["s1", "s2"]}, image_column=None)  # fmt: skip
    a, b = image(folder / "pics" / "a.png"), image(tmp_path / "b.png")
    entries = list(D.from_hf_dataset(folder))
    assert [(e.id, e.image, e.question, e.answer) for e in entries] == [
        ("s1", str(a), "p0", "x"),  # the first of a list of answers
        ("s2", str(b), "p1", None),
    ]
    b.unlink()
    with pytest.raises(FileNotFoundError, match=r"row 1: image not found.*resolve against the dataset's folder"):
        list(D.from_hf_dataset(folder))


def test_hf_dataset_dict_splits(tmp_path):
    folder = save(tmp_path / "dd", {"image": hf_images(COLORS[:2]), "question": ["q", "q"]}, splits=["train", "test"])
    assert len(D.from_hf_dataset(folder, split="test")) == 2
    assert D.from_hf_dataset(folder, split="test").description == f"dataset {folder} split test (2 rows)"
    with pytest.raises(ValueError, match=r"holds several splits: train, test; pass --split NAME"):
        D.from_hf_dataset(folder)
    with pytest.raises(ValueError, match=r"has no split 'dev': train, test"):
        D.from_hf_dataset(folder, split="dev")
    single = save(tmp_path / "one", {"image": hf_images(COLORS[:1]), "question": ["q"]}, splits=["validation"])
    assert [e.where for e in D.from_hf_dataset(single)] == [f"dataset {single} split validation row 0"]


@pytest.mark.parametrize(
    "columns, options, says",
    [
        ({"image": "pic"}, {"image_column": "nope"}, ["no column 'nope' (--image-column)", "columns: pic, question"]),
        ({"image": "pic"}, {"image_column": "pic", "answer_column": "ans"}, ["no column 'ans' (--answer-column)"]),
        ({"image": "pic"}, {}, ["no image column", "columns: pic, question", "--image-column NAME"]),
        ({"question": "ask"}, {}, ["no question column", "columns: image, ask", "--question-column NAME or --prompt"]),
    ],
)
def test_hf_missing_columns_list_what_exists(tmp_path, columns, options, says):
    renamed = {columns.get(k, k): v for k, v in {"image": ["x.png"], "question": ["q"]}.items()}
    folder = save(tmp_path / "ds", renamed, image_column=None)
    with pytest.raises(ValueError) as raised:
        D.from_hf_dataset(folder, **options)
    assert all(fragment in str(raised.value) for fragment in says), str(raised.value)


def test_hf_dataset_is_lazy_a_late_corrupt_row_fails_late(tmp_path, monkeypatch):
    folder = save(tmp_path / "ds", {"image": hf_images(COLORS[:5], bad=3), "question": ["q"] * 5})
    with monkeypatch.context() as patch:  # sizing the source decodes no image
        patch.setattr(Image, "open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("opened")))
        source = D.from_hf_dataset(folder)
        assert len(source) == 5
    entries = iter(source)
    assert [next(entries).id for _ in range(3)] == ["row-0", "row-1", "row-2"]
    with pytest.raises(ValueError, match=r"row 3: unreadable image bytes.*--skip-bad"):
        next(entries)
    errors = [e.error is not None for e in D.from_hf_dataset(folder, skip_bad=True)]
    assert errors == [False, False, False, True, False]


def test_hf_duplicate_ids_and_fingerprint(tmp_path):
    folder = save(tmp_path / "ds", {"image": hf_images(COLORS[:3]), "question": ["q"] * 3, "id": ["a", "b", "a"]})
    with pytest.raises(ValueError, match=r"row 2: id 'a' at row 2 repeats row 0; give every row a unique id"):
        D.from_hf_dataset(folder)  # checked before iterating (one small column)
    entries = list(D.from_hf_dataset(folder, skip_bad=True))
    assert [e.id for e in entries] == ["a", "b", "a@row-2"] and entries[2].error is not None
    source = D.from_hf_dataset(folder, skip_bad=True)
    assert source.fingerprint == D.from_hf_dataset(folder, skip_bad=True).fingerprint
    assert source.fingerprint != D.from_hf_dataset(folder, skip_bad=True, prompt="other").fingerprint
    other = save(tmp_path / "ds2", {"image": hf_images(COLORS[:3]), "question": ["Q"] * 3, "id": ["a", "b", "c"]})
    assert D.from_hf_dataset(other).fingerprint != source.fingerprint


def test_not_a_dataset_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a dataset folder written by save_to_disk"):
        D.from_hf_dataset(tmp_path)


# -- in-memory samples and the dispatcher -----------------------------------------------------------------------


def test_from_samples(tmp_path):
    pil = Image.new("RGB", (8, 8), "red")
    samples = [Sample(tmp_path / "a.png", "q", "red", "s"), Sample(pil, "q2", None, "s", planted=True),
               Sample(pil, "q3")]  # fmt: skip
    entries = list(D.from_samples(samples))
    assert [(e.index, e.id, e.planted) for e in entries] == [(0, "s", False), (1, "s#2", True), (2, "2", False)]
    assert entries[0].image == str(tmp_path / "a.png") and entries[1].image is pil
    changed = D.from_samples([samples[0], Sample(Image.new("RGB", (8, 8), "blue"), "q2", None, "s", True), samples[2]])
    assert D.from_samples(samples).fingerprint == D.from_samples(samples).fingerprint != changed.fingerprint


def test_open_source(tmp_path):
    image(tmp_path / "imgs" / "a.png")
    manifest = jsonl(tmp_path / "m.jsonl", {"image": "imgs/a.png", "question": "q"})
    for options in ({}, {"manifest": manifest, "images": tmp_path / "imgs"}, {"images": "x", "dataset": "y"}):
        with pytest.raises(ValueError, match=r"exactly one of --manifest FILE, --image DIR or --dataset DIR"):
            D.open_source(**options)
    with pytest.raises(ValueError, match=r"--image-column apply to --dataset only"):
        D.open_source(manifest=manifest, image_column="pic")
    with pytest.raises(ValueError, match="a manifest has its own"):
        D.open_source(manifest=manifest, prompt="q")
    assert [e.id for e in D.open_source(manifest=manifest, image_column=None)] == ["a.png"]
    assert [e.question for e in D.open_source(images=tmp_path / "imgs", prompt="look")] == ["look"]
    folder = save(tmp_path / "ds", {"pic": hf_images(COLORS[:1]), "ask": ["q"]}, image_column="pic")
    assert [e.question for e in D.open_source(dataset=folder, question_column="ask")] == ["q"]
