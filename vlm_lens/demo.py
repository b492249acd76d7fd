"""The tiny end-to-end demo: trace a greedy generation and print the logit lens of every generated token.

``python -m vlm_lens.demo`` runs on the embedded default model when it is installed, otherwise on a tiny random
LLaVA (which shows the mechanics, not knowledge). The full analysis lives in ``vlm-lens analyze`` (experiments).
"""

from __future__ import annotations

import argparse

import torch


def lens_table(trace) -> tuple[torch.Tensor, list[str]]:
    """Probability of each generated token at every layer of the residual stack (correct lens, final norm).

    Returns ``[n_layers + 1, n_steps]`` probabilities and the row labels.
    """
    model = trace.cache.model
    stack, labels = trace.cache.resid_stack(trace.step_positions, return_labels=True)
    probs = model.unembed(stack).softmax(-1)  # [layer, step, vocab]
    index = trace.generated_ids.to(probs.device).view(1, -1, 1).expand(probs.shape[0], -1, 1)
    return probs.gather(-1, index).squeeze(-1).cpu(), labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Logit lens over a traced generation.")
    parser.add_argument("--model", default=None, help="embedded name, checkpoint folder, or 'tiny-llava'")
    parser.add_argument("--image", default=None, help="image path (default: a bundled shapes-world image)")
    parser.add_argument("--prompt", default="what color is the circle ?")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    import vlm_lens
    from vlm_lens import testing, zoo

    console = Console()
    name = args.model or (zoo.DEFAULT_MODEL if zoo.DEFAULT_MODEL in zoo.embedded_names() else "tiny-llava")
    if name == "tiny-llava":
        console.print("[yellow]embedded model not installed: running a tiny *random* LLaVA (mechanics only)")
        model = testing.hooked("llava")
        size = testing.TINY.image_size
    else:
        model = vlm_lens.load(name)
        size = model.hf_model.config.vision_config.image_size
    image = args.image or testing.sample_image(4, size)
    inputs = model.prepare(image, args.prompt)
    trace = model.trace_generation(inputs, max_new_tokens=args.max_new_tokens)
    console.print(f"model: {model}")
    console.print(f"prompt: {inputs.prompt!r}")
    console.print(f"generated: {trace.text!r}  (lens reproduces every token: {bool(trace.lens_agrees.all())})")
    probs, labels = lens_table(trace)
    table = Table(title="p(generated token) by layer (correct logit lens)")
    table.add_column("layer")
    for token in trace.generated_tokens:
        table.add_column(token, justify="right")
    for label, row in zip(labels, probs):
        table.add_row(label, *[f"{p:.3f}" for p in row.tolist()])
    console.print(table)


if __name__ == "__main__":  # pragma: no cover
    main()
