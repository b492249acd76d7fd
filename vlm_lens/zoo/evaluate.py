"""Held-out evaluation of an embedded model: accuracy per task and the per-layer answer-probability curves.

``vlm-lens zoo evaluate shapes-llava --n 500`` prints the figures that docs/zoo.md records: exact-match
accuracy per task on ``n`` held-out questions each, and (correct lens, single-word questions answered correctly)
the mean probability of the answer token per layer, the median first layer where it exceeds 0.5, and the share of
questions with p < 0.1 at the embeddings and p > 0.5 at the last layer.
"""

from __future__ import annotations

import time

import torch

from vlm_lens.zoo import shapes_world as sw

SINGLE_WORD_TASKS = ("color", "shape", "count", "position")


def accuracy(model, n_per_task: int, start: int = 0) -> dict:
    from vlm_lens.zoo.answers import answer_questions

    result = {}
    for task in sw.TASKS:
        examples = sw.held_out(n_per_task, task=task, start=start)
        answers = answer_questions(model.hf_model, model.processor, examples)
        result[task] = sum(a == e.answer for a, e in zip(answers, examples)) / len(examples)
    return result


def layer_curves(model, n_per_task: int, start: int = 500_000) -> dict:
    n = model.n_layers
    out = {}
    for task in SINGLE_WORD_TASKS:
        curves, firsts, clean = [], [], []
        for example in sw.held_out(n_per_task, task=task, start=start):
            inputs = model.prepare(example.image, example.question)
            logits, cache = model.run_with_cache(inputs, names_filter=model.resid_names)
            answer = model.tokenizer.convert_tokens_to_ids(example.answer)
            if int(logits[0, -1].argmax()) != answer:
                continue
            probs = model.unembed(cache.resid_stack(inputs.layout.last_prompt_position)[:, 0]).softmax(-1)[:, answer]
            curves.append(probs)
            clean.append(bool(probs[0] < 0.1 and probs[-1] > 0.5))
            if (probs > 0.5).any():
                firsts.append(int(torch.nonzero(probs > 0.5)[0]))
        stacked = torch.stack(curves) if curves else torch.zeros(0, n + 1)
        out[task] = {
            "n_correct": len(curves),
            "mean_prob_per_layer": [round(x, 3) for x in stacked.mean(0).tolist()],
            "median_first_above_half": float(torch.tensor(firsts).median()) if firsts else None,
            "share_low_then_high": sum(clean) / len(clean) if clean else None,
        }
    return out


def report(name: str, n_per_task: int = 500, n_curves: int = 100) -> dict:
    """The figures docs/zoo.md records for model ``name`` (``vlm-lens zoo evaluate NAME``)."""
    import vlm_lens

    start = time.perf_counter()
    model = vlm_lens.load(name)
    example = sw.held_out(1, task="color")[0]
    trace = model.trace_generation(model.prepare(example.image, example.question), max_new_tokens=4)
    first_answer_s = time.perf_counter() - start
    return {
        "model": name,
        "load_and_first_answer_s": round(first_answer_s, 2),
        "first_answer": trace.text,
        "accuracy": accuracy(model, n_per_task),
        "layer_curves": layer_curves(model, n_curves),
        "n_layers": model.n_layers,
    }
