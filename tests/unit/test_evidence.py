"""The evidence detectors as pure functions: runs, mutation events, critical layers, order statistics, bootstrap."""

import pytest
import torch

from vlm_lens.experiments.analysis import evidence as ev
from vlm_lens.experiments.analysis import summary_stats as ss

# stack layers 0..8; token ids: 1 = the true answer, 2 = the prior word, 3 = an early default, 9 = the embedding copy
TRUE, PRIOR, EARLY, COPY = 1, 2, 3, 9


def curves_of(**by_token):
    return {int(k.removeprefix("t")): v for k, v in by_token.items()}


def test_top1_runs_are_maximal_with_their_peaks():
    runs = ev.top1_runs([COPY, EARLY, EARLY, TRUE, TRUE, TRUE, PRIOR, PRIOR, PRIOR], [0.3, 0.2, 0.4, 0.3, 0.6, 0.9, 0.7, 0.9, 1.0])
    assert [(r.token, r.start, r.end) for r in runs] == [(COPY, 0, 0), (EARLY, 1, 2), (TRUE, 3, 5), (PRIOR, 6, 8)]
    assert [r.peak for r in runs] == [0.3, 0.4, 0.9, 1.0]


def planted_like():
    """The true answer emerges (0.01 at layer 1), leads at 4-6, and is overturned at layer 7 by the prior."""
    top1 = [COPY, EARLY, EARLY, EARLY, TRUE, TRUE, TRUE, PRIOR, PRIOR]
    curves = curves_of(
        t1=[0.0, 0.01, 0.03, 0.05, 0.38, 0.75, 0.96, 0.12, 0.0],
        t2=[0.0, 0.03, 0.01, 0.01, 0.01, 0.01, 0.0, 0.84, 1.0],
        t3=[0.0, 0.08, 0.09, 0.10, 0.05, 0.02, 0.01, 0.0, 0.0],
        t9=[0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    )
    return top1, curves


def test_a_planted_overturn_is_an_event_at_the_layer_the_leader_loses_top1():
    top1, curves = planted_like()
    event = ev.mutation_event(top1, curves)
    assert event == ev.MutationEvent(layer=7, leader=TRUE, leader_run=(4, 6), leader_peak=0.96, critical=4)
    # critical_rule="prob": the first layer from which the leader stays >= 0.5 up to its run's end
    assert ev.mutation_event(top1, curves, ev.DetectionConfig(critical_rule="prob")).critical == 5


LENS_ONLY = ev.DetectionConfig(confirm=False)  # established runs, no causal test: the pure lens rule


def test_what_is_not_a_mutation():
    top1, curves = planted_like()
    # the same curves, but the emitted token is the leader: nothing overturned
    same = top1[:7] + [TRUE, TRUE]
    assert ev.mutation_event(same, {**curves, TRUE: curves[TRUE][:7] + [0.9, 0.95]}, LENS_ONLY) is None
    # (as a candidate, the early EARLY run (p 0.1) would be left to the causal test, which asks what layer 4 writes)
    assert ev.mutation_event(same, {**curves, TRUE: curves[TRUE][:7] + [0.9, 0.95]}).leader == EARLY
    # a leader that never reaches establish_prob is not established
    weak = {**curves, TRUE: [0.0, 0.01, 0.03, 0.05, 0.3, 0.4, 0.45, 0.1, 0.0]}
    assert ev.mutation_event(top1, weak, LENS_ONLY) is None
    # a one-layer lead is not a phase (min_run = 2)
    short = [COPY, EARLY, EARLY, EARLY, EARLY, EARLY, TRUE, PRIOR, PRIOR]
    assert ev.mutation_event(short, curves, LENS_ONLY) is None
    assert ev.mutation_event(short, curves, ev.DetectionConfig(min_run=1, confirm=False)).layer == 7
    # the earlier emerge rule (off by default): a default already likely after the embeddings is not established
    default = [COPY, EARLY, EARLY, EARLY, TRUE, TRUE, TRUE, TRUE, TRUE]
    prior_like = {**curves, EARLY: [0.0, 0.6, 0.7, 0.6, 0.2, 0.0, 0.0, 0.0, 0.0], TRUE: [0.0, 0.0, 0.1, 0.2, 0.6, 0.8, 0.9, 0.95, 0.99]}
    assert ev.mutation_event(default, prior_like, ev.DetectionConfig(emerge_below=0.1, confirm=False)) is None
    assert ev.mutation_event(default, prior_like, LENS_ONLY).leader == EARLY
    # the embedding layer (0) never starts an established answer
    assert ev.mutation_event([COPY, COPY, TRUE, TRUE], {COPY: [0.9, 0.9, 0.0, 0.0], TRUE: [0.0, 0.0, 0.9, 0.9]}) is None


def prior_like_curves(curves):
    return {**curves, COPY: [0.9, 0.5, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], EARLY: [0.0, 0.3, 0.7, 0.6, 0.2, 0.0, 0.0, 0.0, 0.0],
            TRUE: [0.0, 0.0, 0.1, 0.2, 0.6, 0.8, 0.9, 0.95, 0.99]}  # fmt: skip


def test_the_swap_verdict_needs_a_strict_majority_of_the_pictures():
    assert ev.image_independent(3, 4) and ev.image_independent(1, 1) and ev.image_independent(2, 3)
    assert not ev.image_independent(2, 4) and not ev.image_independent(0, 4)
    assert not ev.image_independent(0, 0)  # no picture could be tried: nothing is confirmed


def test_the_emitted_half_also_reads_the_layer_before_the_overturn_under_every_picture():
    """emitted_written = 2 kept > tried, or (swap_before) kept_before == tried > 0: the formula, case by case."""
    for swap_before in (True, False):
        config = ev.DetectionConfig(swap_before=swap_before)
        for tried in range(0, 5):
            for kept in range(tried + 1):
                for before in range(tried + 1):
                    expected = (tried > 0 and 2 * kept > tried) or (swap_before and tried > 0 and before == tried)
                    assert ev.emitted_written(kept, before, tried, config) is expected, (swap_before, kept, before, tried)
    assert ev.emitted_written(2, 4, 4) and not ev.emitted_written(2, 3, 4)  # a tie is carried only by all four before


def test_the_leader_half_of_the_swap_test_needs_an_answer_to_this_input():
    """leader_weighed: "image" = some reference changes the leader (held < tried); "output" = the leader is among the
    output's top-contender_k (rank 0 = the emitted token's place); "either" (default) = one of the two; "both" = the
    two (evidence-guided decoding's)."""
    cases = [(4, 4, None), (3, 4, None), (4, 4, 1), (4, 4, 4), (4, 4, 5), (0, 0, None), (0, 0, 2), (3, 4, 1), (2, 4, 6)]
    for test in ("either", "both", "image", "output", "off"):
        config = ev.DetectionConfig(leader_test=test)
        for held, tried, rank in cases:
            image = tried > 0 and held < tried
            output = rank is not None and rank < 5
            expected = {"either": image or output, "both": image and output, "image": image, "output": output, "off": True}[test]
            assert ev.leader_weighed(held, tried, rank, config) is expected, (test, held, tried, rank)
    assert not ev.leader_weighed(4, 4, 2, ev.DetectionConfig(contender_k=2))  # rank 2 is the third candidate
    assert ev.leader_weighed(4, 4, 1, ev.DetectionConfig(contender_k=2))


def test_candidates_are_looser_runs_left_to_the_causal_tests():
    top1, curves = planted_like()
    # with confirmation on (the default) a one-layer lead is a candidate, whatever its probability ...
    short = [COPY, EARLY, EARLY, EARLY, EARLY, EARLY, TRUE, PRIOR, PRIOR]
    assert ev.mutation_event(short, curves) == ev.MutationEvent(7, TRUE, (6, 6), 0.96, 6)
    low = {**curves, TRUE: [0.0, 0.01, 0.03, 0.05, 0.05, 0.1, 0.39, 0.1, 0.0]}
    assert ev.mutation_event(short, low).leader == TRUE
    # ... unless a floor is set; the peak is read on the run's own layers
    assert ev.mutation_event(short, low, ev.DetectionConfig(candidate_prob=0.4)) is None
    assert ev.mutation_event(short, low, ev.DetectionConfig(candidate_prob=0.3)).leader == TRUE
    # a special token (here COPY standing for <unk>) is never a leader: the earlier answer is taken instead
    unk_last = [COPY, EARLY, COPY, TRUE, TRUE, TRUE, TRUE, TRUE, TRUE]
    anywhere = ev.DetectionConfig(deep_from=0.0)  # these overturns are shallow (layer 3 of 8)
    assert ev.mutation_event(unk_last, prior_like_curves(curves), anywhere).leader == COPY
    assert ev.mutation_event(unk_last, prior_like_curves(curves), anywhere, not_answers={COPY}).leader == EARLY
    assert ev.mutation_event([COPY, COPY, COPY, TRUE, TRUE, TRUE, TRUE, TRUE, TRUE], curves, not_answers={COPY}) is None
    # the prior-like default is a candidate too: only the grounding test can refute it (confirmation.py)
    default = [COPY, EARLY, EARLY, EARLY, TRUE, TRUE, TRUE, TRUE, TRUE]
    prior_like = {**curves, EARLY: [0.0, 0.6, 0.7, 0.6, 0.2, 0.0, 0.0, 0.0, 0.0], TRUE: [0.0, 0.0, 0.1, 0.2, 0.6, 0.8, 0.9, 0.95, 0.99]}
    assert ev.mutation_event(default, prior_like).leader == EARLY


def test_only_an_overturn_in_the_deep_half_is_a_candidate():
    """deep_from = 0.5: the overturn's layer m (where the leader lost the top-1) must satisfy m >= deep_from * n."""
    curves = curves_of(t1=[0, 0.6, 0.7, 0.6, 0.2, 0, 0, 0, 0], t3=[0, 0, 0.1, 0.2, 0.6, 0.8, 0.9, 0.95, 0.99],
                       t9=[1, 0, 0, 0, 0, 0, 0, 0, 0])  # fmt: skip
    for m in range(2, 9):  # EARLY leads stack layers 1 .. m-1 of n = 8, TRUE from m on
        top1 = [COPY] + [EARLY] * (m - 1) + [TRUE] * (9 - m)
        for deep_from in (0.0, 0.25, 0.5, 0.75, 1.0):
            event = ev.mutation_event(top1, curves, ev.DetectionConfig(deep_from=deep_from))
            assert (event is not None) is (m >= deep_from * 8), (m, deep_from)
            assert event is None or (event.layer, event.leader) == (m, EARLY)
    # the last overturn in the deep half is the event, whatever came before it in the shallow half
    top1 = [COPY, PRIOR, PRIOR, EARLY, EARLY, EARLY, EARLY, TRUE, TRUE]
    assert ev.mutation_event(top1, {**curves, PRIOR: [0, 0.9, 0.9, 0, 0, 0, 0, 0, 0]}).layer == 7
    with pytest.raises(ValueError, match="deep_from must be in"):
        ev.DetectionConfig(deep_from=1.5)


def test_confirmation_windows_start_at_the_overturning_layer_and_stay_in_the_model():
    # stack layer 7 is decoder layer 6's output: skip [6], then [6, 7]
    assert ev.confirmation_windows(7, 8) == [[6], [6, 7]]
    assert ev.confirmation_windows(8, 8) == [[7]]  # the last layer: [7, 8] clips to [7], a duplicate
    assert ev.confirmation_windows(3, 8, ev.DetectionConfig(confirm_windows=((-1, 0),))) == [[1, 2]]
    with pytest.raises(ValueError, match="confirm_windows"):
        ev.DetectionConfig(confirm_windows=((),))


def test_the_last_overturned_answer_is_the_event():
    top1 = [COPY, TRUE, TRUE, EARLY, EARLY, PRIOR, PRIOR]
    curves = curves_of(t1=[0, 0.05, 0.9, 0.1, 0, 0, 0], t3=[0, 0.01, 0.05, 0.8, 0.9, 0.1, 0], t2=[0, 0, 0, 0, 0, 0.9, 1.0],
                       t9=[1, 0, 0, 0, 0, 0, 0])  # fmt: skip
    assert ev.mutation_event(top1, curves).leader == EARLY and ev.mutation_event(top1, curves).layer == 5


def test_answer_critical_reads_the_final_run():
    top1 = [COPY, EARLY, TRUE, TRUE, TRUE, TRUE]
    curves = curves_of(t1=[0, 0.2, 0.4, 0.45, 0.7, 0.9], t3=[0, 0.5, 0, 0, 0, 0], t9=[1, 0, 0, 0, 0, 0])
    assert ev.answer_critical(top1, curves) == 2  # top-1 from layer 2 to the end
    assert ev.answer_critical(top1, curves, ev.DetectionConfig(critical_rule="prob")) == 4
    never = curves_of(t1=[0, 0.2, 0.3, 0.3, 0.4, 0.45], t3=[0, 0.5, 0, 0, 0, 0], t9=[1, 0, 0, 0, 0, 0])
    assert ev.answer_critical(top1, never) is None  # not established: undetermined
    assert ev.stays_from([0.0, 0.1, 0.6, 0.3, 0.7, 0.9, 0.95], 6, 0.5) == 4
    assert ev.stays_from([0.1, 0.2, 0.4], 2, 0.5) is None


def test_order_statistics_are_consistent():
    stats = ss.order_stats([1, 4])
    assert stats["q1"] <= stats["median"] <= stats["q3"] and {stats["q1"], stats["median"], stats["q3"]} <= {1, 4}
    values = [7, 3, 3, 8, 5, 6, 4, 7, 7]
    stats = ss.order_stats(values)
    ordered = sorted(values)
    assert (stats["q1"], stats["median"], stats["q3"]) == (ordered[2], ordered[4], ordered[6])  # floor(q (n-1))
    assert ss.order_stats([])["median"] is None


def test_event_share_bootstrap_resamples_samples():
    none = ss.event_share_interval([0] * 10, [3] * 10)
    assert none["share"] == 0 and none["low"] == none["high"] == 0
    every = ss.event_share_interval([1] * 10, [1] * 10)
    assert every["low"] == every["high"] == 1.0
    events, tokens = [1, 0, 0, 2, 0, 1], [2, 1, 3, 2, 1, 1]
    result = ss.event_share_interval(events, tokens, n_boot=500, seed=3)
    assert result["share"] == 4 / 10 and result["events"] == 4 and result["tokens"] == 10
    # the same replicates by hand: whole samples drawn with replacement
    g = torch.Generator().manual_seed(3)
    index = torch.randint(0, 6, (500, 6), generator=g)
    e, t = torch.tensor(events, dtype=torch.float64), torch.tensor(tokens, dtype=torch.float64)
    shares = e[index].sum(1) / t[index].sum(1)
    low, high = torch.quantile(shares, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    assert result["low"] == pytest.approx(low) and result["high"] == pytest.approx(high)
    assert ss.event_share_interval([], [])["share"] is None


@pytest.mark.parametrize(
    "kwargs, message",
    [({"establish_prob": 0}, "establish_prob"), ({"min_run": 0}, "min_run"), ({"critical_rule": "median"}, "critical_rule"),
     ({"min_event_share": 1.0}, "min_event_share"), ({"bootstrap": 0}, "bootstrap"), ({"test": "blank"}, "test must be"), ({"leader_test": "all"}, "leader_test must be"),
     ({"contender_k": 0}, "contender_k >= 1"),
     ({"references": 0}, "references >= 1")],
)  # fmt: skip
def test_detection_config_rejects_bad_thresholds(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ev.DetectionConfig(**kwargs)


def test_position_reservoir_is_bounded_and_uniform():
    from vlm_lens.experiments.analysis.tuned_lens import PositionReservoir

    reservoir = PositionReservoir(budget=50, seed=0)
    for chunk in range(40):  # 40 stacks of 25 positions: 1000 positions, each tagged with its index
        ids = torch.arange(chunk * 25, (chunk + 1) * 25, dtype=torch.float32)
        reservoir.add(ids.view(1, -1, 1).expand(2, -1, 3))
    kept = reservoir.stack()
    assert kept.shape == (2, 50, 3) and reservoir.seen == 1000
    values = kept[0, :, 0]
    assert len(set(values.tolist())) == 50 and torch.equal(kept[0], kept[1])  # distinct positions, layers together
    assert 300 < float(values.mean()) < 700  # drawn from the whole stream, not its start or end (expected 499.5)
    small = PositionReservoir(budget=100)
    small.add(torch.zeros(2, 7, 3))
    assert small.stack().shape == (2, 7, 3)  # fewer positions than the budget: all kept
    with pytest.raises(ValueError, match="budget"):
        PositionReservoir(0)


def test_grounded_critical_is_where_the_image_made_the_answer():
    from vlm_lens.experiments.analysis.evidence import grounded_critical

    # the answer (7) is top-1 from layer 2; without the image it is top-1 up to layer 3, then something else
    top1, blank = [0, 5, 7, 7, 7, 7], [0, 5, 7, 7, 9, 9]
    assert grounded_critical(top1, blank, 2) == 4
    assert grounded_critical(top1, top1, 2) is None  # the question alone gives the answer everywhere: not grounded
    assert grounded_critical(top1, [0, 1, 1, 1, 1, 1], 2) == 2  # the image needed from the start
    assert grounded_critical(top1, blank, None) is None
    assert grounded_critical([0, 7, 3, 7, 7, 7], [0, 1, 1, 1, 1, 1], 1) == 3  # the final run starts at 3


def test_grounding_needs_the_leader_gone_at_most_of_its_run():
    assert ev.is_grounded([0, 1, 9, 9, 9], leader=9, run=(2, 4)) is False  # the blank image gives it everywhere
    assert ev.is_grounded([0, 1, 9, 2, 2], leader=9, run=(2, 4)) is True  # 1 of 3 layers
    assert ev.is_grounded([0, 1, 9, 9, 2, 2], leader=9, run=(2, 5)) is False  # 2 of 4: not fewer than half
