"""Fine token roles: what each position of a prompt is, beyond the layout's image / text / generated.

Tiling families put several kinds of positions in the stream: patches of image tiles, a downscaled thumbnail of the
whole image, learned newline embeddings at row ends (LLaVA-NeXT, OneVision) and text tokens that delimit images, tiles
or rows (Pixtral's ``[IMG_BREAK]``, Idefics3's ``<row_1_col_1>``). The adapter declares them
(:meth:`~vlm_lens.adapters.AdapterSpec.position_roles`); this module reads them for prepared inputs and writes the
one-line summary docs/hooks.md tabulates per family. The layout's ``image`` mask is exactly the positions whose role is
an image kind (patch, thumbnail, newline): positions that carry image features.
"""

from __future__ import annotations

IMAGE_KINDS = ("patch", "thumbnail", "newline")


def position_roles(model, inputs) -> list[str]:
    """The fine role of every position of one prepared sample (``model.prepare(image, question)``): ``"text"``,
    ``"marker"`` or ``"<kind> <k>"`` (``"patch 0"``, ``"thumbnail 0"``, ``"newline 0"``) for image k; positions
    after the prompt are ``"generated"``."""
    n_prompt = inputs.layout.n_prompt  # generated tokens are never image tokens or markers: only the prompt is read
    prompt = model.adapter.position_roles(model.hf_model.config, model.tokenizer, inputs.input_ids[0, :n_prompt],
                                          inputs.model_inputs)  # fmt: skip
    return prompt + ["generated"] * (inputs.layout.n_positions - n_prompt)


def is_image_role(role: str) -> bool:
    """Whether a fine role carries image features (patch, thumbnail or newline of some image)."""
    return role.split(" ")[0] in IMAGE_KINDS


def summarize(roles: list[str]) -> str:
    """Run-length summary: ``"text x5, marker, patch 0 x4, marker, text x3"``."""
    runs: list[list] = []
    for role in roles:
        if runs and runs[-1][0] == role:
            runs[-1][1] += 1
        else:
            runs.append([role, 1])
    return ", ".join(role if n == 1 else f"{role} x{n}" for role, n in runs)
