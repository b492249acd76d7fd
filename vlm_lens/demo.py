"""The tiny end-to-end demo: trace a greedy generation and print the logit lens of every generated token.

``vlm-lens demo`` runs on the embedded default model (or ``--model tiny-llava``: a tiny random LLaVA, which shows the
mechanics, not knowledge). The full analysis lives in ``vlm-lens analyze``.
"""

from __future__ import annotations

import torch


def lens_table(trace) -> tuple[torch.Tensor, list[str]]:
    """Probability of each generated token at every layer of the residual stack (correct lens, final norm).

    Returns ``[n_layers + 1, n_steps]`` probabilities and the row labels.
    """
    model = trace.model
    stack, labels = trace.cache.resid_stack(trace.step_positions, return_labels=True)
    probs = model.unembed(stack).softmax(-1)  # [layer, step, vocab]
    index = trace.generated_ids.to(probs.device).view(1, -1, 1).expand(probs.shape[0], -1, 1)
    return probs.gather(-1, index).squeeze(-1).cpu(), labels


def run(model: str | None = None, image=None, prompt: str = "what color is the circle ?", max_new_tokens: int = 8) -> None:
    """Print the logit lens of a traced generation (``vlm-lens demo``)."""
    from rich.console import Console
    from rich.table import Table

    import vlm_lens
    from vlm_lens import testing, zoo

    console = Console()
    name = model or (zoo.DEFAULT_MODEL if zoo.DEFAULT_MODEL in zoo.embedded_names() else "tiny-llava")
    if name == "tiny-llava":
        console.print("[yellow]a tiny *random* LLaVA (mechanics only, no knowledge)")
        hooked = testing.hooked("llava")
        size = testing.TINY.image_size
    else:
        hooked = vlm_lens.load(name)
        size = hooked.hf_model.config.vision_config.image_size
    inputs = hooked.prepare(image or testing.sample_image(4, size), prompt)
    trace = hooked.trace_generation(inputs, max_new_tokens=max_new_tokens)
    console.print(f"model: {hooked}")
    console.print(f"prompt: {inputs.prompt!r}")
    console.print(f"generated: {trace.text!r}  (lens reproduces every token: {bool(trace.lens_agrees.all())})")
    probs, labels = lens_table(trace)
    table = Table(title="p(generated token) by stack layer (0 = embeddings; correct logit lens)")
    table.add_column("layer")
    for token in trace.generated_tokens:
        table.add_column(token, justify="right")
    for label, row in zip(labels, probs):
        table.add_row(label, *[f"{p:.3f}" for p in row.tolist()])
    console.print(table)
