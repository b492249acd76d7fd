"""Where in the image knowledge lives: the lens on image tokens scored against the known object cells.

    python benchmarks/patch_localization.py            # 60 fresh images per model; writes docs/experiments.md
    python benchmarks/patch_localization.py --n 5 --no-write

For each object of fresh shapes-world images (held-out seeds) and each embedded model: at every stack layer, with
:class:`~vlm_lens.probes.ImagePatchLens`, the patch where the object's colour word (resp. shape word) is most probable
— does it fall inside the object's cell of the 3 x 3 grid (pointing) — and the share of that word's probability mass
over the image that sits inside the object's cell. Chance for both is the cell's share of the image tokens (1/9 on the
embedded models, whose images are 3 x 3 tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the benchmarks package beside it

MODELS = ("shapes-llava", "shapes-qwen2-vl")
START = 40_000_000  # held-out seeds of their own (training < 4M, plants 5M+, held-out evaluation 10M+)


def cell_of(row: int, col: int, rows: int, cols: int, grid: int) -> int:
    """The shapes-world cell (row-major in the ``grid`` x ``grid`` layout) a token at ``(row, col)`` covers."""
    return (row * grid // rows) * grid + col * grid // cols


def score(name: str, n: int) -> dict:
    import torch

    import vlm_lens
    from vlm_lens.probes import ImagePatchLens
    from vlm_lens.zoo import shapes_world as sw

    model = vlm_lens.load(name)
    L = model.n_layers + 1
    hits = {kind: torch.zeros(L) for kind in ("color", "shape")}
    mass = {kind: torch.zeros(L) for kind in ("color", "shape")}
    chance, count = 0.0, 0
    for i in range(n):
        example = sw.example(START + i, task="color")
        inputs = model.prepare(example.image, example.question)
        _, cache = model.run_with_cache(inputs, names_filter=model.resid_names)
        words = sorted({w for o in example.objects for w in (o.color, o.kind)})
        prob = ImagePatchLens(words)(cache, inputs=inputs)["prob"][:, 0]  # [layer, row, col, word]
        rows, cols = prob.shape[1], prob.shape[2]
        cells = torch.tensor([[cell_of(r, c, rows, cols, sw.GRID) for c in range(cols)] for r in range(rows)])
        for obj in example.objects:
            inside = cells == obj.cell
            chance += float(inside.float().mean())
            count += 1
            for kind, word in (("color", obj.color), ("shape", obj.kind)):
                p = prob[..., words.index(word)]  # [layer, row, col]
                best = p.reshape(L, -1).argmax(-1)
                hits[kind] += inside.reshape(-1)[best].float()
                mass[kind] += (p * inside).sum((1, 2)) / p.sum((1, 2))
    return {"model": name, "images": n, "objects": count, "chance": chance / count,
            **{f"pointing_{k}": (v / count).tolist() for k, v in hits.items()},
            **{f"mass_{k}": (v / count).tolist() for k, v in mass.items()}}  # fmt: skip


def ablation(name: str, n: int) -> dict:
    """Colour questions on fresh images: accuracy and answer probability as they are, with the asked object's
    token(s) ablated (mean, zero), and with as many random other image tokens ablated (mean)."""
    import random

    import vlm_lens
    from vlm_lens.probes import TokenAblation
    from vlm_lens.zoo import shapes_world as sw

    model = vlm_lens.load(name)
    rng = random.Random(0)
    right = {"original": 0, "object (mean)": 0, "object (zero)": 0, "random (mean)": 0}
    prob = dict.fromkeys(right, 0.0)
    for i in range(n):
        example = sw.example(START + i, task="color")
        inputs = model.prepare(example.image, example.question)
        image = inputs.layout.positions("image").tolist()
        (rows, cols), = model.image_grids(inputs)
        asked = next(o for o in example.objects if o.color == example.answer)  # colours are distinct in an image
        own = [image[r * cols + c] for r in range(rows) for c in range(cols) if cell_of(r, c, rows, cols, sw.GRID) == asked.cell]
        others = rng.sample([p for p in image if p not in own], len(own))
        for label, positions, mode in (("object (mean)", own, "mean"), ("object (zero)", own, "zero"), ("random (mean)", others, "mean")):
            result = TokenAblation(mode)(inputs, positions, example.answer, model=model)
            right[label] += result.provenance["generated"][1] == example.answer
            prob[label] += float(result["answer_prob"][1])
            if label == "object (mean)":
                right["original"] += result.provenance["generated"][0] == example.answer
                prob["original"] += float(result["answer_prob"][0])
    return {"model": name, "questions": n, "accuracy": {k: v / n for k, v in right.items()},
            "answer_prob": {k: v / n for k, v in prob.items()}}


def ablation_table(rows: list[dict]) -> str:
    labels = list(rows[0]["accuracy"])
    lines = ["| model (colour questions) | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for r in rows:
        cells = [f"{r['accuracy'][k]:.2f} (p {r['answer_prob'][k]:.2f})" for k in labels]
        lines.append(f"| {r['model']} ({r['questions']} fresh images) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        lines += [f"**{r['model']}** ({r['images']} fresh images, {r['objects']} objects; chance {r['chance']:.2f} for "
                  "both scores: the object's cell is one token of the 3 x 3 image)", "",
                  "| stack layer | " + " | ".join(str(i) for i in range(len(r["pointing_color"]))) + " |",
                  "|---|" + "---|" * len(r["pointing_color"])]  # fmt: skip
        for key, label in (("pointing_color", "pointing, colour word"), ("pointing_shape", "pointing, shape word"),
                           ("mass_color", "mass in the cell, colour word"), ("mass_shape", "mass in the cell, shape word")):
            lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in r[key]) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=60, help="fresh images per model")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    rows = [score(name, args.n) for name in MODELS]
    ablations = [ablation(name, args.n) for name in MODELS]
    text = table(rows) + "\n\nToken ablation (`TokenAblation`): accuracy (mean answer probability) as the model is, with the " \
        "asked object's image token replaced by the image tokens' mean or by zeros, and with as many random other " \
        "image tokens mean-ablated:\n\n" + ablation_table(ablations)  # fmt: skip
    print(text)
    if not args.no_write:
        from benchmarks.docs_blocks import write_block

        command = "python benchmarks/patch_localization.py" + (f" --n {args.n}" if args.n != 60 else "")
        body = f"Measured with `{command}`.\n\n{text}\n\n<details><summary>raw numbers</summary>\n\n```json\n" \
               f"{json.dumps({'localization': rows, 'ablation': ablations}, indent=1)}\n```\n</details>"  # fmt: skip
        write_block("experiments.md", "patch-localization", body, "## Where in the image: the lens on image tokens")


if __name__ == "__main__":
    main()
