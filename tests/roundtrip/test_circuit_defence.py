"""Circuit extraction finds a circuit known by construction; its attribution equals ablation where the logit is linear
in the features; the defender's budget, Fine-Pruning and DER behave as documented."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from helpers import planted_one_layer, planted_task_model, random_model

from acg.compiler.acg import ACG
from acg.compiler.fit import FitSpec, fit
from acg.compiler.transcoder import Transcoder
from acg.compiler.transformer import Transformer, TransformerConfig
from acg.roundtrip import circuit, defence, dense
from acg.zoo.tasks import is_clean
from acg.zoo.train import TrainSpec


@dataclass(frozen=True)
class Ex:
    ids: list[int]
    answer_id: int

    @property
    def prompt(self) -> tuple:
        return tuple(self.ids)


def test_extraction_finds_the_planted_circuit():
    model, acg = planted_task_model()
    data = [Ex([0, 1], 3), Ex([0, 2], 4), Ex([0, 5, 1], 3), Ex([0, 5, 2], 4)] * 5
    ref = {"t": 1.0}
    out = circuit.extract(model, acg, data, {"t": data}, ref, tolerance=0.01)
    assert out.target_met and out.report["k"] == 2
    assert out.selection.features[0].tolist() == [0, 1]
    assert np.all(out.scores[0][2:] == 0) and np.all(out.scores[0][:2] > 0)
    assert out.report["task_acc"] == ref
    k1 = next(p for p in out.curve if p["k"] == 1)
    assert k1["task_acc"]["t"] == 0.5  # one of the two features alone answers half the prompts
    own = circuit.extract(model, acg, data, {"t": data}, tolerance=0.01)  # reference: the model's own accuracy
    assert own.reference == ref and own.report["k"] == 2


def test_token_elimination_drops_the_tokens_the_answers_do_not_need():
    """Tokens 1 and 2 carry the answers; 0 (every prompt's first) and the distractor 5 drive only features that write
    where the unembedding does not read: the circuit keeps 1 and 2 and reads 0 and 5 as their positions alone."""
    model, acg = planted_task_model()
    data = [Ex([0, 1], 3), Ex([0, 2], 4), Ex([0, 5, 1], 3), Ex([0, 5, 2], 4)] * 5
    assert circuit.token_share(data, 6).tolist() == [1.0, 0.5, 0.5, 0.0, 0.0, 0.5]
    out = circuit.extract(model, acg, data, {"t": data}, {"t": 1.0})
    assert np.flatnonzero(out.selection.tokens).tolist() == [1, 2]
    assert out.report["tokens_refined_away"] == [0, 5] and out.report["tokens_kept"] == 2
    assert out.report["task_acc"] == {"t": 1.0} and out.report["k"] == 2
    pruned, _ = dense.prune(acg, out.selection)
    assert circuit.accuracy(circuit.answer_logits(dense.to_dense(pruned), data), data) == 1.0
    every = circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, refine_tokens=0)
    assert np.flatnonzero(every.selection.tokens).tolist() == [0, 1, 2, 5] and every.report["tokens_refined_away"] == []
    rarest = circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, refine_tokens=3)  # tries 1, 2, 5: not 0
    assert rarest.report["tokens_refined_away"] == [5]
    anything = circuit.extract(model, acg, data, {"t": data}, {"t": 0.0})  # a target any circuit meets
    assert np.flatnonzero(anything.selection.tokens).tolist() == [0] and anything.report["k"] == 1  # the last stays
    with pytest.raises(ValueError, match="refine_tokens must be >= 0"):
        circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, refine_tokens=-1)
    # read as the kept tokens' mean instead (e5 + (e1 + e2) / 2: under both answer features' thresholds), 0 and 5
    # go as before; the selection carries the prompts' token counts, the round trip the mean
    mean = circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, token_ablation="mean")
    assert mean.report["tokens_refined_away"] == [0, 5] and mean.report["token_ablation"] == "mean"
    assert mean.selection.token_fill.tolist() == [20.0, 10.0, 10.0, 0.0, 0.0, 10.0]
    pruned, report = dense.prune(acg, mean.selection)
    assert report["token_fill"] == "mean"
    np.testing.assert_allclose(pruned.weights["embed.W_E"][0], acg.weights["embed.W_E"][[1, 2]].mean(0))
    assert circuit.accuracy(circuit.answer_logits(dense.to_dense(pruned), data), data) == 1.0
    with pytest.raises(ValueError, match="token_ablation must be one of zero, mean"):
        circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, token_ablation="resample")


def test_the_elimination_judges_the_model_build_makes_of_each_candidate():
    """A shipped form of the circuit that needs token 0 (as a blocked round trip can need `<bos>`): judged on it, the
    elimination keeps 0 and leaves out 5 alone; judged on the replacement model (the default) both go. Every
    candidate reaches `build` as a selection of the given ACG."""
    model, acg = planted_task_model()
    data = [Ex([0, 1], 3), Ex([0, 2], 4), Ex([0, 5, 1], 3), Ex([0, 5, 2], 4)] * 5
    seen = []

    def needs_token_0(a: ACG, sel: dense.Selection) -> Transformer:
        seen.append(sel)
        replacement = circuit.replacement_of(a, sel)
        if not sel.tokens[0]:  # the shipped form breaks without it: every logit zero, no answer right
            replacement.unembed.W_U.data.zero_()
            replacement.unembed.b_U.data.zero_()
        return replacement

    out = circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, build=needs_token_0)
    assert out.report["tokens_refined_away"] == [5] and out.report["judged_on"] == "needs_token_0"
    assert np.flatnonzero(out.selection.tokens).tolist() == [0, 1, 2] and out.report["k"] == 2
    assert seen and all(isinstance(s, dense.Selection) and s.restrict_attention for s in seen)
    default = circuit.extract(model, acg, data, {"t": data}, {"t": 1.0})
    assert default.report["tokens_refined_away"] == [0, 5] and default.report["judged_on"] == "replacement_of"
    validated = circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, validation={"t": data}, build=needs_token_0)
    assert validated.report["validated"] and validated.report["tokens_refined_away"] == [5]


def test_backward_elimination_leaves_out_a_redundant_feature_the_ranking_puts_first():
    model, acg = planted_task_model(redundant=True)
    data = [Ex([0, 1], 3), Ex([0, 2], 4)] * 5
    plain = circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, refine=0)
    assert plain.report["k"] == plain.report["k_top"] == 3 and plain.report["refined_away"] == 0
    assert next(p for p in plain.curve if p["k"] == 2)["task_acc"]["t"] == 0.5  # top 2 = the redundant pair
    out = circuit.extract(model, acg, data, {"t": data}, {"t": 1.0})
    assert out.target_met and out.report["k_top"] == 3 and out.report["k"] == 2 and out.report["refined_away"] == 1
    kept = out.selection.features[0].tolist()
    assert 1 in kept and len(set(kept) & {0, 2}) == 1
    assert out.report["task_acc"] == {"t": 1.0} and out.selection.meta["k"] == 2
    with pytest.raises(ValueError, match="refine must be >= 0"):
        circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, refine=-1)


def test_a_circuit_over_its_feature_bound_is_cut_by_measured_cost_not_by_attribution():
    """The top 3 without elimination: 0 and 2 (redundant, the most attributed) and 1 (needed, the least). Cut to 2,
    the measured costs keep 1 and one of 0 / 2 and the target holds; cut to 1 it cannot, and the report says so."""
    model, acg = planted_task_model(redundant=True)
    data = [Ex([0, 1], 3), Ex([0, 2], 4)] * 5
    free = circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, refine=0)
    assert free.report["k"] == 3 and free.report["budget"] is None
    two = circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, refine=0, max_features=2, validation={"t": data})
    kept = two.selection.features[0].tolist()
    assert 1 in kept and len(kept) == 2 and two.report["task_acc"] == {"t": 1.0} and two.report["k"] == 2
    # refine 0: the cut's first round measures twice the excess, the 2 least attributed
    assert two.report["budget"] == {
        "max_features": 2, "k_before": 3, "cut": 1, "trials": 2, "met": True, "validated": True
    }  # fmt: skip
    assert two.report["refined_away"] == 0 and two.report["k_top"] == 3
    one = circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, refine=0, max_features=1)
    assert one.report["k"] == 1 and one.report["task_acc"] == {"t": 0.5}
    assert one.report["budget"]["met"] is False and one.report["budget"]["validated"] is None
    assert one.report["budget"]["cut"] == 2 and one.report["budget"]["trials"] == 3 + 2  # two rounds of one each
    roomy = circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, max_features=5)  # the elimination fits it
    assert roomy.report["k"] == 2 and roomy.report["budget"]["cut"] == 0 and roomy.report["budget"]["trials"] == 0
    assert roomy.report["budget"]["met"] is True
    with pytest.raises(ValueError, match="max_features must be >= 1"):
        circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, max_features=0)


def test_cut_to_budget_halves_the_excess_each_round_and_measures_only_the_cheapest_again():
    costs = {0: 0.0, 1: -0.5, 2: 0.0, 3: -0.1, 4: 0.0, 5: -0.2}  # what removing each feature alone costs

    def slack(chosen: list[int]) -> float:
        return sum(costs[f] for f in range(6) if f not in chosen)

    # excess 4: 4 and 2 go (free; 0, also free, is the most attributed); then 0 of the 4 cheapest; then 3 of the 2
    cut, trials = circuit.cut_to_budget([0, 1, 2, 3, 4, 5], 2, slack)
    assert sorted(cut) == [1, 5] and trials == 6 + 4 + 2
    same, none = circuit.cut_to_budget([3, 1], 2, slack)
    assert same == [3, 1] and none == 0


def test_cut_to_budget_first_round_reaches_only_the_least_attributed_it_is_given():
    costs = {0: 0.0, 1: -0.5, 2: -0.3, 3: -0.1, 4: -0.2, 5: -0.4}  # 0, the most attributed, is free to leave out

    def slack(chosen: list[int]) -> float:
        return sum(costs[f] for f in range(6) if f not in chosen)

    every, n_every = circuit.cut_to_budget([0, 1, 2, 3, 4, 5], 5, slack)
    assert 0 not in every and n_every == 6
    quick, n_quick = circuit.cut_to_budget([0, 1, 2, 3, 4, 5], 5, slack, first=3)  # 5, 4, 3: 3 is the cheapest
    assert quick == [0, 1, 2, 4, 5] and n_quick == 3
    wider, n_wider = circuit.cut_to_budget([0, 1, 2, 3, 4, 5], 3, slack, first=1)  # never fewer than twice the excess
    assert n_wider >= 6 and 0 not in wider
    with pytest.raises(ValueError, match="first must be >= 0"):
        circuit.cut_to_budget([0, 1], 1, slack, first=-1)


@pytest.mark.parametrize("act", ["relu", "jumprelu"])
def test_mlp_feature_budget_is_the_most_features_whose_round_trip_fits_the_share(act):
    """The bound is checked against `n_params` of real round trips: k features fit, k + 1 do not."""
    model, acg = planted_task_model()  # 10 live neurons of 2 * 8 + 1 parameters, and 8 for the output bias: 178
    if act == "jumprelu":
        tc = acg.transcoders[0]
        jump = Transcoder(tc.W_enc, tc.b_enc, tc.W_dec, tc.b_dec, "jumprelu", np.full(tc.n_features, 0.01))
        acg = dataclasses.replace(acg, transcoders=(jump,))
    original = dense.n_params(model)["n_params_mlp"]
    assert original == 178
    for share in (0.3, 0.5, 1.0):
        k = dense.mlp_feature_budget(model, acg, share)

        def mlp_of(n: int) -> int:
            sel = dense.Selection((np.arange(n),), np.ones(6, bool), np.ones(4, bool))
            return dense.roundtrip(acg, sel)[2]["n_params_mlp"]

        assert mlp_of(k) <= share * original
        assert k == acg.transcoders[0].n_features or share * original < mlp_of(k + 1)
    assert dense.mlp_feature_budget(model, acg, 1.0) == (10 if act == "relu" else 9)  # (178 - 8) // 17, // 18
    with pytest.raises(dense.RoundtripError, match="holds no feature"):
        dense.mlp_feature_budget(model, acg, 0.1)  # 17.8 - 8 < 17
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        dense.mlp_feature_budget(model, acg, 0.0)


def _outweighed() -> tuple[Transformer, ACG]:
    """One layer as in `_planted`; token 1 drives features 0, 1 and 2 (activation 0.5 each): feature 0 writes answer 3's
    logit (+2), feature 1 works against it (+4 to answer 3, +6.5 to answer 4: the most attributed, and harmful),
    feature 2 writes +1 to answer 3 only, just enough to outweigh feature 1; every token reads 1.5 on answer 5. The
    top 3 answer "1 -> 3"; the smallest faithful circuit is {0}."""
    d, V, n = 8, 6, 6
    cfg = TransformerConfig(
        n_layers=1, d_model=d, n_heads=1, d_head=d, d_mlp=n, d_vocab=V, n_ctx=4, act_fn="relu", normalization_type=None
    )
    e = np.eye(d)
    W_E = np.stack([e[5] + (e[k] if k < 5 else 0) for k in range(V)])
    W_enc = np.zeros((d, n))
    W_enc[1, :3] = 1.0
    W_enc[5, 3:] = 1.0
    b_enc = np.array([-0.5] * 3 + [0.0] * 3)
    W_dec = np.zeros((n, d))
    W_dec[0, 3], W_dec[1, 3], W_dec[1, 4], W_dec[2, 3] = 4.0, 8.0, 13.0, 2.0  # x 0.5: +2; +4, +6.5; +1
    W_dec[3:, 6] = 1.0
    W_U = np.zeros((d, V))
    W_U[3, 3] = W_U[4, 4] = 1.0
    W_U[5, 5] = 1.5
    return planted_one_layer(cfg, W_E, W_U, W_enc, b_enc, W_dec)


def test_a_second_elimination_pass_leaves_out_what_only_outweighed_a_removed_feature():
    """Least attributed first, the first pass keeps 2 (without it 1 wins), keeps 0 and leaves out 1; the second finds
    2 no longer needed (0 alone answers), the third nothing: {0}, where one pass stops at {0, 2}."""
    model, acg = _outweighed()
    data = [Ex([0, 1], 3), Ex([5, 1], 3)] * 5
    scores, _ = circuit.feature_attribution(model, acg, data)
    assert circuit.ranked(scores)[:3].tolist() == [1, 0, 2]
    one = circuit.extract(model, acg, data, {"t": data}, {"t": 1.0})  # one pass by default
    assert one.report["k_top"] == 3 and one.selection.features[0].tolist() == [0, 2] and one.report["passes"] == 1
    out = circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, passes=3)
    assert out.selection.features[0].tolist() == [0] and out.report["refined_away"] == 2
    assert out.report["passes"] == 3 and out.report["task_acc"] == {"t": 1.0}
    with pytest.raises(ValueError, match="passes must be >= 1"):
        circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, passes=0)


def _interchangeable(n: int) -> tuple[Transformer, ACG]:
    """One layer as in `_planted`: token 1 drives features 0 .. n - 2 (activation 0.5 each), any one of which answers 3
    (feature i writes 2 + 0.1 i: the later, the more attributed); token 2 drives feature n - 1, which answers 4 weakly
    (0.2: the least attributed of all). No k short of all n holds "1 -> 3, 2 -> 4"; the smallest faithful circuit is
    {n - 2, n - 1}."""
    d, V = 8, 6
    cfg = TransformerConfig(
        n_layers=1, d_model=d, n_heads=1, d_head=d, d_mlp=n, d_vocab=V, n_ctx=4, act_fn="relu", normalization_type=None
    )
    e = np.eye(d)
    W_E = np.stack([e[5] + (e[k] if k < 5 else 0) for k in range(V)])
    W_enc = np.zeros((d, n))
    W_enc[1, : n - 1] = W_enc[2, n - 1] = 1.0
    W_dec = np.zeros((n, d))
    W_dec[: n - 1, 3] = 4.0 + 0.2 * np.arange(n - 1)
    W_dec[n - 1, 4] = 0.4
    W_U = np.zeros((d, V))
    W_U[3, 3] = W_U[4, 4] = 1.0
    return planted_one_layer(cfg, W_E, W_U, W_enc, np.full(n, -0.5), W_dec)


def test_block_elimination_finds_the_single_features_circuit_in_fewer_trials():
    """16 features, least attributed first: 15 (needed), 0 .. 14 (all but the last removable). One at a time: 16
    trials. Blocks up to 4: [15] stays, [0] goes, then [1 2], [3 .. 6], [7 .. 10]; [11 .. 14] fails, [11 12] goes,
    [13 14] fails, [13] goes, [14] stays: 10 trials, the same circuit."""
    model, acg = _interchangeable(16)
    data = [Ex([0, 1], 3), Ex([0, 2], 4)] * 5
    scores, _ = circuit.feature_attribution(model, acg, data)
    assert circuit.ranked(scores)[::-1].tolist() == [15, *range(15)]
    single = circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, refine_tokens=0)
    assert single.report["k_top"] == 16 and single.selection.features[0].tolist() == [14, 15]
    assert single.report["trials"] == 16 and single.report["block"] == 1
    blocks = circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, refine_tokens=0, block=4)
    assert blocks.selection.features[0].tolist() == [14, 15] and blocks.report["refined_away"] == 14
    assert blocks.report["trials"] == 10 and blocks.report["task_acc"] == {"t": 1.0}
    wide = circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, refine_tokens=0, block=64)  # [7 .. 14] fails
    assert wide.selection.features[0].tolist() == [14, 15] and wide.report["trials"] == 11
    with pytest.raises(ValueError, match="block must be >= 1"):
        circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, block=0)


def test_the_target_is_held_with_a_margin_against_selection_luck():
    """Each decision asks for reference - tolerance + margin: by default one standard error of the reference on the
    selection prompts, at most half the tolerance. One feature answers half the prompts: enough for a target of 0.48,
    not for 0.53."""
    model, acg = planted_task_model()
    data = [Ex([0, 1], 3), Ex([0, 2], 4)] * 10
    loose = circuit.extract(model, acg, data, {"t": data}, {"t": 0.58}, tolerance=0.1, margin=0.0)
    assert loose.report["k"] == 1 and loose.report["margin"] == {"t": 0.0}
    held = circuit.extract(model, acg, data, {"t": data}, {"t": 0.58}, tolerance=0.1)
    assert held.report["k"] == 2 and held.report["margin"] == {"t": 0.05}  # sqrt(.58 .42 / 20) = 0.11, capped
    assert circuit.selection_margin(0.964, 1000, 0.01) == 0.005
    assert circuit.selection_margin(0.99, 1000, 0.01) == pytest.approx(np.sqrt(0.99 * 0.01 / 1000))
    assert circuit.selection_margin(1.0, 20, 0.01) == 0.0
    with pytest.raises(ValueError, match="margin must be in"):
        circuit.extract(model, acg, data, {"t": data}, {"t": 1.0}, tolerance=0.01, margin=0.02)


def test_validation_prompts_undo_removals_that_only_the_selection_prompts_allow():
    """The selection prompts ask only "1 -> 3", so the elimination drops feature 1 (which the attribution prompts,
    mostly "2 -> 4", ranked first); validation prompts that also ask "2 -> 4" take the step back."""
    model, acg = planted_task_model()
    fit_examples = [Ex([0, 2], 4)] * 15 + [Ex([0, 1], 3)] * 5
    selection = {"t": [Ex([0, 1], 3), Ex([0, 5, 1], 3)] * 5}
    plain = circuit.extract(model, acg, fit_examples, selection, {"t": 1.0})
    assert plain.report["k_top"] == 2 and plain.report["k"] == 1 and plain.report["validated"] is None
    assert plain.selection.features[0].tolist() == [0]
    both = {"t": [Ex([0, 1], 3), Ex([0, 2], 4)] * 5}
    out = circuit.extract(model, acg, fit_examples, selection, {"t": 1.0}, validation=both)
    assert out.report["k"] == 2 and out.report["refined_away"] == 0 and out.report["validated"] is True
    assert out.selection.features[0].tolist() == [0, 1]
    same = circuit.extract(model, acg, fit_examples, selection, {"t": 1.0}, validation=selection)
    assert same.report["k"] == 1 and same.report["validated"] is True and same.report["validation_checks"] == 1
    blocks = circuit.extract(model, acg, fit_examples, selection, {"t": 1.0}, validation=both, block=2)  # scanned back
    assert blocks.selection.features[0].tolist() == [0, 1] and blocks.report["validated"] is True
    assert blocks.report["validation_checks"] == 4  # top k, tokens 2 and 0 out, feature 1 out: only the top k holds


def test_where_not_even_the_top_k_validates_each_removal_is_held_to_lose_nothing_there():
    """The attribution and selection prompts ask only "1 -> 3": feature 1 never fires on them, so the circuit is
    feature 0, which the validation prompts' "2 -> 4" half shows short of the target. Left out all the same: the
    tokens the validation prompts never hold (0 also drives nothing the answers read), which lose nothing there."""
    model, acg = planted_task_model()
    only_ones = [Ex([0, 1], 3), Ex([0, 5, 1], 3)] * 5
    both = {"t": [Ex([0, 1], 3), Ex([0, 2], 4)] * 5}
    out = circuit.extract(model, acg, only_ones, {"t": only_ones}, {"t": 1.0}, validation=both)
    assert out.report["validated"] is False and out.report["k"] == 1
    assert out.selection.features[0].tolist() == [0]
    assert np.flatnonzero(out.selection.tokens).tolist() == [1] and out.report["tokens_refined_away"] == [0, 5]


def test_last_passing_finds_the_end_of_a_monotone_run_by_bisection():
    calls: list[int] = []

    def upto(limit: int):
        def ok(i: int) -> bool:
            calls.append(i)
            return i <= limit

        return ok

    assert circuit.last_passing(100, upto(37)) == 37 and len(calls) <= 2 + 7
    assert circuit.last_passing(5, upto(10)) == 4 and calls[-1] == 4
    assert circuit.last_passing(5, upto(-1)) is None
    assert circuit.last_passing(1, upto(0)) == 0 and circuit.last_passing(1, upto(-1)) is None


def test_last_passing_scans_back_where_the_run_is_not_monotone():
    calls: list[int] = []

    def ok(i: int) -> bool:  # holds at 2 and 5 only: bisection, taking it as monotone, gives up at 0
        calls.append(i)
        return i in (2, 5)

    assert circuit.last_passing(10, ok) is None
    calls.clear()
    assert circuit.last_passing(10, ok, scan=True) == 5 and calls == [9, 8, 7, 6, 5]
    assert circuit.last_passing(10, lambda i: False, scan=True) is None


def test_a_missed_target_holds_the_circuit_to_what_the_candidates_reach_not_the_whole_dictionary():
    model, acg = planted_task_model()
    data = [Ex([0, 1], 3), Ex([0, 2], 4)] * 5
    out = circuit.extract(model, acg, data, {"t": data}, {"t": 2.0})  # accuracy 2.0: unreachable
    assert not out.target_met and out.report["k"] == out.report["candidates"] == 2
    assert out.report["held_to"] == {"t": 1.0} and out.reference == out.report["reference"] == {"t": 2.0}
    assert out.selection.features[0].tolist() == [0, 1]  # features 2..9 fire on every token but never reach a logit
    assert max(p["k"] for p in out.curve) == 2
    met = circuit.extract(model, acg, data, {"t": data}, {"t": 1.0})
    assert met.target_met and met.report["held_to"] is None
    # three candidates, two of them redundant: the smallest circuit as faithful as all three, not all three
    model, acg = planted_task_model(redundant=True)
    out = circuit.extract(model, acg, data, {"t": data}, {"t": 2.0}, validation={"t": data})
    assert not out.target_met and out.report["candidates"] == 3 and out.report["held_to"] == {"t": 1.0}
    assert out.report["k"] == 2 and out.report["task_acc"] == {"t": 1.0} and out.report["validated"] is True
    # held to the candidates only where they fall short: a task they reach keeps its own reference
    two = circuit.extract(model, acg, data, {"t": data, "u": data}, {"t": 2.0, "u": 0.5}, tolerance=0.01)
    assert two.report["held_to"] == {"t": 1.0, "u": 0.5}
    with pytest.raises(dense.RoundtripError, match="no feature carries any attribution"):
        circuit.extract(model, acg, [Ex([0, 5], 3)] * 4, {"t": data}, {"t": 1.0})


def test_attribution_equals_ablation_where_the_logit_is_linear_in_the_features():
    model = random_model(seed=71, act_fn="relu", normalization_type=None, d_vocab=60, n_ctx=32)
    rng = np.random.default_rng(0)
    corpus = [list(map(int, rng.integers(0, 60, rng.integers(3, 12)))) for _ in range(150)]
    acg, _ = fit(model, corpus, FitSpec(width=24, steps=60, target_l0=6, e2e_steps=0, usage_prompts=40), progress=False)
    exs = [Ex(corpus[i], int(rng.integers(0, 60))) for i in range(6)]
    _, signed = circuit.feature_attribution(model, acg, exs)
    n0, n1 = acg.n_features()
    full = dense.to_dense(acg, torch.float64)
    for i in range(n1):
        keep = (np.arange(n0), np.delete(np.arange(n1), i))
        sel = dense.Selection(keep, np.ones(60, bool), np.ones(32, bool), restrict_attention=False)
        ablated = dense.to_dense(dense.prune(acg, sel)[0], torch.float64)
        for j, ex in enumerate(exs):
            toks = torch.tensor([ex.ids])
            with torch.no_grad():
                a, b = full(toks)[0, -1], ablated(toks)[0, -1]
            effect = (a[ex.answer_id] - a.mean()) - (b[ex.answer_id] - b.mean())
            assert abs(float(effect) - signed[j, n0 + i]) <= 1e-9 * max(1.0, abs(float(effect)))


def test_edges_count_virtual_weights_between_kept_nodes():
    model, acg = planted_task_model()
    counts = circuit.n_edges(acg)
    assert counts["L0.enc"] == 2 + 8 * 6  # token 1 -> f0, token 2 -> f1, e5 (every token) -> f2..f9
    assert counts["logits"] == 4  # f0 -> answer 3, f1 -> answer 4, and tokens 3 and 4 straight to their logits


def test_clean_budget_is_clean_sized_and_seeded():
    spec = TrainSpec(steps=100)
    budget = defence.clean_budget(spec, 0.05, seed=3)
    assert len(budget) == 1280 and all(is_clean(ex.prompt) for ex in budget)
    assert budget == defence.clean_budget(spec, 0.05, seed=3) and budget != defence.clean_budget(spec, 0.05, seed=4)
    with pytest.raises(ValueError):
        defence.clean_budget(spec, 0.0)


def test_fine_pruning_prunes_the_least_active_and_keeps_them_pruned():
    model = random_model(seed=72, d_vocab=60, n_ctx=32, d_model=16, d_mlp=32, act_fn="relu")
    budget = defence.clean_budget(TrainSpec(steps=4, batch_size=64), 1.0, seed=0)
    out, report = defence.fine_prune(model, TrainSpec(steps=4, batch_size=64), budget, steps=3, margin=1.0)
    assert report["pruned_fraction"] >= 0.9  # a margin of 1.0 never stops pruning
    for layer, block in enumerate(out.blocks):
        dead = block.mlp.W_in.abs().sum(0) == 0
        assert int(dead.sum()) >= report["pruned_per_layer"][layer]
        assert torch.all(block.mlp.W_out[dead] == 0) and torch.all(block.mlp.b_in[dead] == 0)
    activity = defence.neuron_activity(model, budget[:50])
    strict, _ = defence.fine_prune(model, TrainSpec(steps=4, batch_size=64), budget, steps=1, margin=-1.0)
    assert all((b.mlp.W_in.abs().sum(0) > 0).all() for b in strict.blocks)  # nothing pruned below the margin
    assert all(len(a) == 32 for a in activity)


def test_der():
    assert defence.der(1.0, 0.0, 0.9, 0.9) == 1.0
    assert defence.der(1.0, 1.0, 0.9, 0.9) == 0.5
    assert defence.der(1.0, 0.0, 0.9, 0.5) == pytest.approx(0.8)
    assert defence.der(0.2, 0.5, 0.9, 0.95) == 0.5  # a rise in asr or accuracy counts as no change
