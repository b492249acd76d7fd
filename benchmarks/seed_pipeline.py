"""A faithful re-implementation of the authors' pipeline (paper-spec §3), for side-by-side benchmarks.

1. ``model.generate(..., output_hidden_states=True, return_dict_in_generate=True)``, greedy.
2. Token probabilities (``plot_token_probabilities_area.py``): per generated step j, candidates = deduplicated
   argmax of ``lm_head(hidden_states[j][layer][:, -1])`` over the late layers; then for every layer
   ``softmax(lm_head(hidden_states[j][layer][:, -1]))`` and the candidates' probabilities. No final norm.
3. JS heatmap (``heatmap.py``): per step, ``cat([lm_head(h) for h in hidden_states[j]])`` over the *whole* sequence
   of that step (the full prefill at step 0) before slicing the last position; adjacent-layer pairs with the
   authors' JS expression in float64; the first 40 steps, column-wise MaxAbs scaled.

Same tokens, layers and statistics as ``vlm-lens`` computes with ``variant="paper"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def authors_js(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """The authors' ``compute_js_divergence`` for one pair of layers (paper-spec §3.2, quirk Q3)."""
    p = F.softmax(logits_p.double(), dim=-1)
    q = F.softmax(logits_q.double(), dim=-1)
    m = 0.5 * (p + q)
    kl1 = F.kl_div(F.log_softmax(logits_p.double(), dim=-1), m, reduction="none").mean(-1)
    kl2 = F.kl_div(F.log_softmax(logits_q.double(), dim=-1), m, reduction="none").mean(-1)
    return 0.5 * (kl1 + kl2).mean()


def run(hf_model, model_inputs: dict, max_new_tokens: int, eos_token_id: int, pad_token_id: int,
        suppress_tokens: list[int] | None = None, late_from: int | None = None) -> dict:  # fmt: skip
    """The whole seed pipeline on one sample; returns generated ids, candidate probabilities and the heatmap."""
    with torch.no_grad():
        out = hf_model.generate(
            **model_inputs, max_new_tokens=max_new_tokens, do_sample=False, output_hidden_states=True,
            return_dict_in_generate=True, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            suppress_tokens=suppress_tokens,
        )  # fmt: skip
        hidden = out.hidden_states  # steps x (n_layers + 1) x [1, seq or 1, d]
        lm_head = hf_model.lm_head
        n_states = len(hidden[0])
        late = range(late_from if late_from is not None else (n_states - 1) * 20 // 32, n_states)
        probabilities = []
        for step in hidden[:20]:
            candidates: list[int] = []
            for layer in late:
                token = int(lm_head(step[layer][:, -1, :]).argmax(-1))
                if token not in candidates:
                    candidates.append(token)
            rows = []
            for layer in range(n_states):
                probs = F.softmax(lm_head(step[layer][:, -1, :]), dim=-1)
                rows.append([probs[:, c].mean().item() for c in candidates])
            probabilities.append({"candidates": candidates, "probs": rows})
        heat = []
        for step in hidden[:40]:
            distribution = torch.cat([lm_head(h) for h in step], dim=0)[:, -1, :]  # whole sequence, then slice
            heat.append([authors_js(distribution[i], distribution[i + 1]).item() for i in range(n_states - 1)])
    from vlm_lens.probes.metrics import column_max_abs_scale

    heatmap = column_max_abs_scale(torch.tensor(heat, dtype=torch.float64))
    generated = out.sequences[0, model_inputs["input_ids"].shape[1] :]
    return {"generated_ids": generated, "probabilities": probabilities, "js": heat, "heatmap": heatmap}
