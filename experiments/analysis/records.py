"""The records of the knowledge-evolution analysis: its settings, a sample, and what one sample's analysis holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlm_lens.errors import InputError
from vlm_lens.experiments.analysis import evidence as ev
from vlm_lens.probes.lens_probes import late_layers
from vlm_lens.probes.result import ProbeResult

LENS_VARIANTS = ("correct", "paper", "tuned")


@dataclass(frozen=True)
class EvolutionConfig:
    detection: ev.DetectionConfig = field(default_factory=ev.DetectionConfig)
    variants: tuple[str, ...] = ("correct", "paper")
    max_new_tokens: int = 16
    # EOS and other special tokens are predicted trivially early; by default they are reported per token but left
    # out of the aggregate.
    include_special: bool = False

    def __post_init__(self):
        unknown = set(self.variants) - set(LENS_VARIANTS)
        if unknown or not self.variants:
            raise InputError(f"variants must be among {LENS_VARIANTS}, got {self.variants}")


@dataclass
class Sample:
    """One (image, prompt) pair, with the reference answer when there is one; ``planted`` marks a question the
    model's planted prior is known to overturn (a counter-prior question of a planted fixture)."""

    image: Any
    prompt: str
    answer: str | None = None
    name: str = ""
    planted: bool = False


@dataclass
class TokenEvolution:
    step: int
    token: str
    special: bool
    critical: int | None
    mutation: int | None  # the mutation event's layer; None without an event
    leader: str | None  # the overturned (pre-mutation) answer
    leader_run: list[int] | None  # its established run [start, end] (inclusive)
    event_js: float | None  # adjacent JS across the overturn (layer mutation-1 -> mutation)
    flips: list[int]  # layers > critical whose top-1 differs from the layer below (descriptive)
    kind: str  # "stable" | "mutation" | "undetermined"
    final_prob: float
    # the lens-only candidate and its causal test (evidence.py, confirmation.py); None where there was no candidate
    candidate: int | None = None  # the candidate's layer (where its leader lost the top-1)
    candidate_leader: str | None = None
    confirmed: bool | None = None  # None: no candidate, or confirmation off
    confirm_skipped: list[int] | None = None  # decoder layers skipped by the window that restored (or last tried)
    confirm_top1: str | None = None  # the model's output at this step with those layers skipped
    grounded: bool | None = None  # the leader needs the image (None: not tested)
    swap_kept: int | None = None  # image-swap test: reference pictures under which the overturning layer wrote the token
    swap_tried: int | None = None  # image-swap test: reference pictures tried (None: not tested)
    swap_held: int | None = None  # image-swap test: reference pictures under which the leader still led (not read here)
    leader_rank: int | None = None  # image-swap test: the leader's place in the lens's top-k at the output (None: not in it)
    swap_kept_before: int | None = None  # image-swap test: pictures under which the layer before wrote the token


@dataclass
class SampleEvolution:
    name: str
    prompt: str
    generated_text: str
    answer: str | None
    tokens: dict[str, list[TokenEvolution]]  # by lens variant
    lens: dict[str, ProbeResult] = field(repr=False, default_factory=dict)
    shift: dict[str, ProbeResult] = field(repr=False, default_factory=dict)
    trace: Any = field(repr=False, default=None)
    planted: bool = False
    image: Any = field(repr=False, default=None)  # the input image (path or PIL), for the report
    question: str = ""  # the user's question (``prompt`` is the chat-templated text)
    confirm_forwards: int = 0  # teacher-forced forwards the causal test of candidates ran on this trace
    index: int = 0  # position in the run's samples (the dataset index on the dataset path)
    hallucination: dict = field(repr=False, default_factory=dict)  # per lens variant: the reversal analysis, or {}

    @property
    def correct(self) -> bool | None:
        if self.answer is None:
            return None
        return self.generated_text.strip() == self.answer.strip()

    def curves(self, variant: str, step: int, tokenizer) -> dict[str, list[float]]:
        """Per-layer probabilities at ``step`` of the paper's candidates (distinct top-1 tokens of the late layers,
        by first appearance) plus the overturned leader, if any: what the token-probability charts draw."""
        lens = self.lens[variant]
        n = len(lens.coords["layer"]) - 1
        top1 = lens["topk_ids"][:, step, 0].tolist()
        chosen = list(dict.fromkeys(top1[l] for l in late_layers(n)))
        row = self.tokens[variant][step]
        ids = lens["candidate_ids"][step].tolist()
        if row.leader is not None:
            leader = tokenizer.convert_tokens_to_ids(row.leader)
            chosen += [leader] if leader not in chosen else []
        return {tokenizer.convert_ids_to_tokens(i): lens["candidate_prob"][:, step, ids.index(i)].tolist() for i in chosen}
