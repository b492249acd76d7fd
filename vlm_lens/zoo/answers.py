"""Greedy answers of a shapes-world model to its questions (batched by task), with the chat-templated prompt."""

from __future__ import annotations


def prompt_text(processor, question: str) -> str:
    """The chat-templated prompt for one image and ``question``."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def answer_questions(model, processor, examples, *, max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers for ``examples`` (batched by task: prompts of one task have equal length)."""
    import torch

    answers: dict[int, str] = {}
    by_task: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_task.setdefault(e.task, []).append(i)
    eos = processor.tokenizer.eos_token_id
    for task, idx in by_task.items():
        new = max_new_tokens or (13 if task == "caption" else 2)
        for start in range(0, len(idx), 64):
            chunk = idx[start : start + 64]
            texts = [prompt_text(processor, examples[i].question) for i in chunk]
            inputs = processor(images=[examples[i].image for i in chunk], text=texts, padding=True, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=new, do_sample=False, pad_token_id=eos)
            generated = out[:, inputs["input_ids"].shape[1] :]
            for row, i in enumerate(chunk):
                ids = generated[row].tolist()
                ids = ids[: ids.index(eos)] if eos in ids else ids
                answers[i] = processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
    return [answers[i] for i in range(len(examples))]
