"""Detection from evidence: critical layers, mutation events and the stage rule, as small pure functions.

Notation (one generated token, one lens): stack layers ``l = 0..n`` (0 = embeddings, ``n`` = the model's output);
``top1[l]`` the lens's top-1 token at layer l, ``prob[l]`` the probability the lens gives that token,
``emitted`` the token the model emitted (``top1[n]`` under greedy decoding).

- A **run** of token v is a maximal interval ``[s, e]`` with ``top1[l] = v`` for every l in it.
- A run is **established** when it lasts at least ``min_run`` layers, starts at layer >= ``min_start`` (layer 0 is the
  input token's own embedding, not an answer) and its top-1 probability reaches ``establish_prob`` somewhere in it.
  (``emerge_below``, off by default, adds the earlier rule "its probability at layer ``min_start`` was below it"; that
  rule encoded one base model's early probabilities and missed most overturns on models it was not tuned on.)
- A **candidate** is an overturn read off the lens: the last run ``[s, e]`` of a token ``v != emitted`` that ends
  before the output (``e < n``), starts at layer >= ``min_start``, lasts >= ``candidate_min_run`` layers and peaks at
  p >= ``candidate_prob`` (with ``confirm=False``: the last *established* such run). Its layer is ``m = e + 1``, the first layer at which
  v is no longer top-1; v is the *pre-mutation leader*. The overturn must fall in the deep layers, ``m >= deep_from * n``:
  an earlier top-1 change belongs to the rapid-evolution stage, not the mutation stage.
- A **mutation event** is a candidate that passes a causal test (``confirm=True``, the default). ``test="swap"`` (the
  default): the decoder layer that overturned the leader (stack layer m is its output) must still write the emitted
  token -- the token whose lens logit it raises most -- when the image is replaced by each of ``references`` other
  pictures, for a strict majority of them (:func:`image_independent`): the overturn does not come from this image;
  and the leader must have been an answer to *this* input (``leader_test``, :func:`leader_weighed`).
  ``test="skip"`` (round 2): skipping decoder layers ``confirm_windows`` (offsets from ``m - 1``) must make the model
  emit the leader again, and with ``ground=True`` the leader must need the image (with it blanked it holds the top-1
  at fewer than half of its run's layers). :mod:`vlm_lens.experiments.analysis.confirmation` runs both.
  ``confirm=False`` makes every candidate an event (lens evidence only). A token whose last top-1 run before the
  output is the emitted token's has no candidate; special tokens (``<unk>``, ``</s>``) are never leaders.
- The **critical layer** refers to the answer that dominates the stabilization phase (the leader when there is an
  event, else the emitted token), read on that answer's established run ``[s, e]`` (for the emitted token: its run
  that ends at the output; None when that run is not established). ``critical_rule="top1"`` (default): c = s, the
  layer where the answer becomes top-1 and stands out from the vocabulary (paper-spec §3.1, "spikes sharply ...
  standing out"); ``critical_rule="prob"``: the first layer of the run from which its probability stays
  >= ``establish_prob`` up to the run's last layer where it is >= ``establish_prob``.

Aggregate rule: a mutation stage is reported only when the share of tokens with an event is supported by the
evidence: the lower end of a 95 % percentile bootstrap interval over *samples* (tokens of one sample are not
independent) must exceed ``min_event_share``. Medians and quartiles are order statistics (``lower`` interpolation:
actual layers, always ``q1 <= median <= q3``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Collection, Mapping, Sequence

from vlm_lens.errors import InputError


@dataclass(frozen=True)
class DetectionConfig:
    """Every threshold of the detectors, echoed in report.json.

    - ``establish_prob = 0.5``: an answer with p >= 0.5 is the top-1 and holds the majority of the mass; the paper's
      critical-layer plots read the spike through ~0.5 (paper-spec §3.1).
    - ``min_run = 2``: one layer of top-1 is noise in a shallow stack; two consecutive layers is the shortest run
      that is a "phase" (on an 8-layer model this still lets a leader established at layers 5-6 be found).
    - ``min_start = 1``: the embedding layer's top-1 is the last prompt token's own embedding.
    - ``emerge_below = None`` (off): the earlier rule "p < 0.1 at layer 1" encoded one base model's early
      probabilities; on an independently trained base the true answer often holds 0.1-0.6 there, and the rule threw
      away most real overturns. Input-independent defaults are now told apart causally (``ground``).
    - ``candidate_min_run = 1``, ``candidate_prob = 0.0``: a candidate is the last top-1 run of a non-emitted token
      (one layer suffices, no probability floor); the causal test, not a threshold, decides what is an event. Round 3
      (the suite's split history, :mod:`vlm_lens.zoo.suite`), chosen on the round-3 dev split (four bases, 8 and 6
      layers): a floor of 0.3-0.4 missed a middle plant's one-layer leads at p 0.2-0.3 (recall 0.37 on that fixture).
    - ``confirm = True``, ``test = "swap"``, ``references = 4``: the image-swap test with four reference pictures
      (confirmed by 3 or 4 of them). On round-3 dev it took lens-only false alarms on the clean twins from 0.51 to
      0.03 at recall 0.97; the round-2 skip test gave 0.76 / 0.14 there (docs/experiments.md).
    - ``leader_test = "either"``, ``contender_k = 5`` (swap test): the overturned leader must be an answer to this
      input -- some reference changes it, or it is among the output's top-5 (the lens's top-k kept for the report).
      Round 4, chosen on its dev split (six bases): recall / clean-twin false alarms 0.95 / 0.042 without it, 0.94 /
      0.020 with it; the other options and their figures are in docs/experiments.md.
    - ``swap_before = True`` (swap test, round 7): the emitted half also passes when the decoder layer *before* the
      overturning one wrote the emitted token under every reference (:func:`emitted_written`): a planted layer writes
      the prior one layer before the lens flips (the flip is the next layer's, whose own write varies with the
      picture). Chosen on round 7's dev split (twelve bases): recall 0.887 -> 0.906, clean-twin false alarms 0.015 ->
      0.016; a majority instead of every reference there: 0.911 / 0.025.
    - ``deep_from = 0.5``: a candidate's overturn must happen in the deep half of the stack (stack layer m >= n / 2).
      The paper's mutation layers are the last ones (26-30 of 32; the critical layer ~20), after the answer has
      emerged; a top-1 change in the shallow half is rapid evolution. Round 6, chosen on its dev split (ten bases):
      recall unchanged (0.888), clean-twin false alarms 0.030 -> 0.016 (early writes of a question's default word).
      A mutation planted in the first half of the stack is not looked for; 0 looks everywhere.
    - ``test = "skip"`` settings: ``confirm_windows = ((0,), (0, 1))`` (the decoder layer that first lost the leader,
      then that layer and the next) and ``ground = True`` (the leader must need the image: the blank-image test);
      neither is read by the swap test.
    - ``last_layer_min_run = 2`` (skip test): a skip window that reaches the last decoder layer leaves no layer to run after it,
      so its output is the lens at the leader's last layer — the leader, by construction under the correct lens. That
      restoration only counts for a leader that held the top-1 for at least this many layers; a one-layer lead right
      before the output is the model's last draft, not an answer it had settled on. Added in round 2 (the suite's
      split history, :mod:`vlm_lens.zoo.suite`), chosen on the round-2 dev split (shapes-llava and shapes-qwen2-vl):
      the Qwen base's late position and count drafts were 0.13 false alarms without it, 0.03 with it.
    - ``critical_rule = "top1"``: on a shallow model the probability of an answer often crosses 0.5 only one layer
      before the output; where it becomes the top-1 is the earlier, rank-based reading of the same rise.
    - ``min_event_share = 0.02`` and ``bootstrap = 1000`` (seed 0): a stage needs at least 2 % of tokens with events
      at the 2.5th bootstrap percentile, so one stray event among tens of clean tokens does not make a stage.
    """

    establish_prob: float = 0.5
    min_run: int = 2
    min_start: int = 1
    emerge_below: float | None = None
    candidate_min_run: int = 1
    candidate_prob: float = 0.0
    confirm: bool = True
    test: str = "swap"
    references: int = 4
    leader_test: str = "either"
    contender_k: int = 5
    deep_from: float = 0.5
    swap_before: bool = True
    confirm_windows: tuple[tuple[int, ...], ...] = ((0,), (0, 1))
    ground: bool = True
    last_layer_min_run: int = 2
    critical_rule: str = "top1"
    min_event_share: float = 0.02
    bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.candidate_prob <= 1.0 or self.candidate_min_run < 1:
            raise InputError(f"candidate_prob must be in [0, 1] and candidate_min_run >= 1, got {self.candidate_prob}, "
                             f"{self.candidate_min_run}")  # fmt: skip
        if not 0.0 < self.establish_prob <= 1.0:
            raise InputError(f"establish_prob must be in (0, 1], got {self.establish_prob}")
        if self.min_run < 1 or self.min_start < 0:
            raise InputError(f"min_run must be >= 1 and min_start >= 0, got {self.min_run}, {self.min_start}")
        if self.test not in ("swap", "skip") or self.references < 1:
            raise InputError(f"test must be 'swap' or 'skip' and references >= 1, got {self.test!r}, {self.references}")
        if self.leader_test not in ("either", "both", "image", "output", "off") or self.contender_k < 1:
            raise InputError(f"leader_test must be 'either', 'both', 'image', 'output' or 'off' and contender_k >= 1, got "
                             f"{self.leader_test!r}, {self.contender_k}")  # fmt: skip
        if not 0.0 <= self.deep_from <= 1.0:
            raise InputError(f"deep_from must be in [0, 1] (a fraction of the stack's depth), got {self.deep_from}")
        if self.critical_rule not in ("top1", "prob"):
            raise InputError(f"critical_rule must be 'top1' or 'prob', got {self.critical_rule!r}")
        if not self.confirm_windows or any(not w for w in self.confirm_windows):
            raise InputError(f"confirm_windows must be non-empty offset tuples like ((0,), (0, 1)), got {self.confirm_windows}")
        if not 0.0 <= self.min_event_share < 1.0 or self.bootstrap < 1:
            raise InputError(f"min_event_share must be in [0, 1) and bootstrap >= 1, got {self.min_event_share}, {self.bootstrap}")


@dataclass(frozen=True)
class Run:
    token: int
    start: int
    end: int  # inclusive
    peak: float


@dataclass(frozen=True)
class MutationEvent:
    layer: int  # first layer where the leader is no longer top-1
    leader: int  # the overturned (pre-mutation) token id
    leader_run: tuple[int, int]  # its established run [start, end]
    leader_peak: float  # its highest probability in the run
    critical: int  # the leader's critical layer (``critical_rule``: its run's start, or where p >= establish_prob holds)


def top1_runs(top1: Sequence[int], prob: Sequence[float]) -> list[Run]:
    """Maximal runs of equal top-1 tokens over layers, with each run's peak top-1 probability."""
    runs: list[Run] = []
    start = 0
    for layer in range(1, len(top1) + 1):
        if layer == len(top1) or top1[layer] != top1[start]:
            runs.append(Run(int(top1[start]), start, layer - 1, float(max(prob[start:layer]))))
            start = layer
    return runs


def established_runs(top1: Sequence[int], curves: Mapping[int, Sequence[float]],
                     config: DetectionConfig = DetectionConfig(), *, candidates: bool = False) -> list[Run]:  # fmt: skip
    """The runs that count as established answers (see the module docstring); ``candidates=True``: the looser runs
    that may be tested as overturned answers (``candidate_min_run``, ``candidate_prob``).

    ``curves[v][l]``: the lens probability of token v at layer l, for every token that is top-1 somewhere.
    """
    min_run = config.candidate_min_run if candidates else config.min_run
    prob = config.candidate_prob if candidates else config.establish_prob
    top1_prob = [float(curves[int(v)][l]) for l, v in enumerate(top1)]
    start = min(config.min_start, len(top1) - 1)
    emerge = float("inf") if config.emerge_below is None else config.emerge_below
    return [r for r in top1_runs(top1, top1_prob)
            if r.end - r.start + 1 >= min_run and r.start >= config.min_start
            and r.peak >= prob and float(curves[r.token][start]) < emerge]  # fmt: skip


def stays_from(prob: Sequence[float], end: int, threshold: float) -> int | None:
    """The first layer c <= ``end`` with ``prob[l] >= threshold`` for every l in [c, end]; None if prob[end] < it."""
    if end < 0 or prob[end] < threshold:
        return None
    layer = end
    while layer > 0 and prob[layer - 1] >= threshold:
        layer -= 1
    return layer


def confirmation_windows(layer: int, n_layers: int, config: DetectionConfig = DetectionConfig()) -> list[list[int]]:
    """The decoder-layer sets a candidate at stack layer ``layer`` is tested with: each offset tuple of
    ``confirm_windows`` added to ``layer - 1`` (the decoder layer whose output first lost the leader), clipped to
    ``0..n_layers-1``, duplicates dropped, in order."""
    out: list[list[int]] = []
    for offsets in config.confirm_windows:
        window = sorted({layer - 1 + o for o in offsets if 0 <= layer - 1 + o < n_layers})
        if window and window not in out:
            out.append(window)
    return out


def mutation_event(top1: Sequence[int], curves: Mapping[int, Sequence[float]], config: DetectionConfig = DetectionConfig(),
                   not_answers: Collection[int] = ()) -> MutationEvent | None:  # fmt: skip
    """The candidate event of one token (lens evidence only): the overturn of its last established non-final answer,
    in the deep layers (``deep_from``), or None. With ``config.confirm`` it becomes a mutation event only after the causal test
    (:mod:`vlm_lens.experiments.analysis.confirmation`).

    ``top1[l]``: the lens's top-1 token at stack layer l = 0..n; ``curves[v][l]``: the probability of token v at
    layer l for every v in ``top1``; ``not_answers``: token ids never taken as leaders (the tokenizer's special tokens:
    ``<unk>`` leading at layer 1 before a caption's first word is not an answer that was overturned).
    """
    n = len(top1) - 1
    emitted = int(top1[n])
    runs = established_runs(top1, curves, config, candidates=config.confirm)
    overturned = [r for r in runs if r.token != emitted and r.end < n and r.token not in not_answers
                  and r.end + 1 >= config.deep_from * n]  # fmt: skip
    if not overturned:
        return None  # every established answer is the emitted one: nothing was overturned
    run = overturned[-1]
    return MutationEvent(run.end + 1, run.token, (run.start, run.end), run.peak, _critical_of(run, curves, config))


def _critical_of(run: Run, curves: Mapping[int, Sequence[float]], config: DetectionConfig) -> int:
    if config.critical_rule == "top1":
        return run.start
    curve = list(curves[run.token])
    # the run's last layer with p >= establish_prob, then back while it holds (a candidate run below it: its start)
    above = [l for l in range(run.start, run.end + 1) if curve[l] >= config.establish_prob]
    held = stays_from(curve, above[-1], config.establish_prob) if above else None
    return max(run.start, held) if held is not None else run.start


def answer_critical(top1: Sequence[int], curves: Mapping[int, Sequence[float]],
                    config: DetectionConfig = DetectionConfig()) -> int | None:  # fmt: skip
    """The critical layer of the emitted token: on its established run that ends at the output, or None."""
    n = len(top1) - 1
    final = [r for r in established_runs(top1, curves, replace(config, emerge_below=float("inf"))) if r.end == n]
    return _critical_of(final[0], curves, config) if final else None


def grounded_critical(top1: Sequence[int], blank_top1: Sequence[int], critical: int | None) -> int | None:
    """The first layer l >= ``critical`` from which the emitted answer is the top-1 at every layer up to the output and
    is not the top-1 at l with the image blanked (``blank_top1``: the same sequence, pixel values 0): where the image
    made the answer. None when ``critical`` is None, or when the blank-image run gives the answer at every such layer
    (an answer the question alone gives, e.g. a prior's favourite that happens to be right).

    ``top1`` / ``blank_top1``: ``[layer]`` token ids, stack layers 0..n."""
    if critical is None:
        return None
    n, answer = len(top1) - 1, top1[-1]
    start = max(critical, max((l + 1 for l in range(n + 1) if top1[l] != answer), default=0))
    return next((l for l in range(start, n + 1) if blank_top1[l] != answer), None)


def is_grounded(blank_top1: Sequence[int], leader: int, run: tuple[int, int]) -> bool:
    """The grounding test: with the image blanked (``blank_top1[l]``: the lens top-1 at stack layer l), ``leader``
    holds the top-1 at fewer than half of the layers of its run ``[start, end]``: it was read off the image."""
    start, end = run
    held = sum(blank_top1[l] == leader for l in range(start, end + 1))
    return 2 * held < end - start + 1


def leader_weighed(held: int, tried: int, rank: int | None, config: DetectionConfig = DetectionConfig()) -> bool:
    """The leader half of the image-swap test (``leader_test``): was the overturned leader an answer to *this* input?

    - ``"image"``: some reference picture changes it, ``held < tried`` (``held``: references under which the leader
      still holds the top-1 at half of its run's layers or more): a token that leads whatever the picture (a format
      word or a question's default) is not knowledge read off the image;
    - ``"output"``: it is still a contender at the output, ``rank < contender_k`` (``rank``: its place in the lens's
      top-k at the output, 0 = the emitted token's place; None when it is not among them);
    - ``"either"`` (default): one of the two; ``"both"``: the two (what evidence-guided decoding asks before it
      replaces an answer); ``"off"``: always True."""
    image = tried > 0 and held < tried
    contender = rank is not None and rank < config.contender_k
    return {"off": True, "image": image, "output": contender, "either": image or contender,
            "both": image and contender}[config.leader_test]  # fmt: skip


def emitted_written(kept: int, kept_before: int, tried: int, config: DetectionConfig = DetectionConfig()) -> bool:
    """The emitted half of the image-swap test: the overturning layer wrote the emitted token under a strict majority
    of the ``tried`` references (:func:`image_independent`), or, with ``swap_before``, the layer before it wrote it
    under every one (``kept_before == tried``)."""
    return image_independent(kept, tried) or (config.swap_before and tried > 0 and kept_before == tried)


def image_independent(kept: int, tried: int) -> bool:
    """The image-swap test's verdict: the overturning layer wrote the emitted token under a strict majority of the
    ``tried`` reference pictures (``2 kept > tried``); False when no reference could be tried."""
    return tried > 0 and 2 * kept > tried
