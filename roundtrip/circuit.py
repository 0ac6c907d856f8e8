"""Task circuits: attribute each answer to the ACG's features, keep the smallest set that stays faithful.

Attribution is gradient x activation on the replacement model (every MLP its dictionary, errors dropped): for each
prompt, the answer's logit minus the mean logit, differentiated with respect to every feature's activation at every
position, times the activation, summed over positions. Downstream of the last layer's features the logit is linear
in them, so there the score is exactly the logit change from ablating the feature (tested); through later attention
and layer norms it is the first-order estimate. A feature's score is the mean over prompts of |its attribution|.

Selection ranks all features of all layers together by score and keeps the top k; the faithfulness curve gives
`task_acc` of the pruned replacement model against the fraction kept, and k is the smallest on a grid (refined by
bisection) whose `task_acc` is within `tolerance` of the reference on every task of the set. The candidates are the
features with non-zero attribution: where none of the grid's k meets the target (all of them together miss it: the
dictionary itself is less faithful than the target asks), the report says the target was missed and the circuit is
held instead to what all the candidates reach (per task the lower of the two; the report's `held_to`), so that it is
the smallest circuit as faithful as the dictionary allows rather than every candidate. Then backward elimination
refines the top k: its least attributed features (64 by default) are ablated one at a time, least first, and each is
left out where the target still holds — first-order scores miss redundancy (two features doing one job both score high).
With `passes` above 1 the pass is repeated over the features still kept until one leaves nothing out: a feature
needed only to outweigh another that a later removal left out (one working against the answer) goes in the next.
One pass by default: on testbed-s's code circuit (5%, seed 2) a second pass's removals held on the selection prompts
and not on the validation prompts, which took them all back (264 features either way, 65 s more). With `block` the
pass leaves out runs of features at one try (twice as many after each removal kept, up to `block`; half after one
refused, down to one): where most of the top k can go (testbed-m) that is a few trials per run of removable features
instead of one per feature; where most must stay it saves less (testbed-s 5% seed 2: 305 trials against 351).
Validation then scans the (short) path back from its end to the last circuit that holds there, where one at a time
it bisects: removals of many features at one try go further on the selection prompts, and the path is not monotone
on the validation prompts (testbed-m 5% seed 0: the path falls under the target there when `<bos>` goes, holds again
from 1,447 features down to 359, and not below; bisection gave up at the tokens, the scan keeps 359 where one at a
time kept 341, in 333 trials and 93 checks against 1,638 trials; on testbed-s 5% seed 2 it keeps 216 where one at a
time, bisected, kept 264: MLP 21.3% of the original's, not 26.0%).
Every decision is judged on the same prompts (the curve's), and many decisions on one sample favour a circuit that
is lucky on it: the target is therefore held with a `margin` per task, by default one standard error of the
reference accuracy on those prompts (sqrt(r (1 - r) / n)), at most half the tolerance, so that it still holds on
prompts the selection never saw (the bench measures on others). Tokens kept are those the task's prompts use, less
those the same elimination leaves out (run on the top k before its features; the 64 rarest in the task's prompts
tried, rarest first: a token the task's prompts hold but its answers do not need, such as one a poisoned training
stream scattered through them, is dropped and reads as its position alone); positions, all those they reach;
attention writes are restricted to the kept span. With `token_ablation="mean"` a token left out (and every token the
task's prompts never hold) reads instead as the kept tokens' mean embedding, weighted by how often the task's prompts
hold each (a mean ablation): a prompt off the task is then a run of ordinary task tokens, not of bare positions, and
layer 0's captured pairs reach it (`pairs.read_as_mean`).
A bound on the features (`max_features`; the backdoor table's code circuit: 25% of the original's MLP parameters) is
not part of the elimination's objective: the elimination stops where the target stops it, and a circuit it leaves
larger is then cut to fit by measured cost (`cut_to_budget`), the report's `budget` saying whether the target still
holds (testbed-s's code circuit at 5%, seed 1, on the AMD machine's fit: 302 features, 29.7%, before the bound).
The edges between the kept features are pruned the same way on the unrolled circuit (`roundtrip/edges.py`): a dense
checkpoint cannot leave out a single edge, an unrolled circuit (IR, code) can.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from acg.compiler.acg import ACG
from acg.compiler.replacement import replacement_model
from acg.compiler.transformer import Transformer
from acg.roundtrip.dense import RoundtripError, Selection, prune, to_dense
from acg.roundtrip.evaluate import accuracy, answer_logits, length_batches
from acg.zoo.tasks import Example

TOKEN_ABLATIONS = ("zero", "mean")  # what a token a circuit leaves out reads as: its position alone, or the mean token
GRID = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


def feature_attribution(
    model: Transformer, acg: ACG, examples: Sequence[Example], batch: int = 256
) -> tuple[list[np.ndarray], np.ndarray]:
    """(per layer, mean |attribution| of each feature over the examples; per example and layer, the signed
    attributions [n_examples, n_features_total] concatenated over layers)."""
    repl = replacement_model(model, acg.transcoders).double()
    feats: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(mod, inp, out):
            f = mod.features(inp[0])
            f.retain_grad()
            feats[layer] = f
            return f @ mod.W_dec + mod.b_dec

        return hook

    handles = [block.mlp.register_forward_hook(keep(i)) for i, block in enumerate(repl.blocks)]
    sizes = acg.n_features()
    signed = np.zeros((len(examples), sum(sizes)))
    try:
        for idx in length_batches([ex.ids for ex in examples], batch):
            toks = torch.tensor([examples[i].ids for i in idx])
            answers = torch.tensor([examples[i].answer_id for i in idx])
            logits = repl(toks)[:, -1]
            target = logits.gather(1, answers[:, None]).squeeze(1) - logits.mean(-1)
            target.sum().backward()
            parts = [(feats[layer] * feats[layer].grad).sum(1) for layer in range(len(sizes))]
            signed[idx] = torch.cat(parts, -1).detach().numpy()
    finally:
        for h in handles:
            h.remove()
    mean_abs = np.abs(signed).mean(0)
    bounds = np.cumsum([0, *sizes])
    return [mean_abs[bounds[i] : bounds[i + 1]] for i in range(len(sizes))], signed


@dataclass
class Circuit:
    selection: Selection
    curve: list[dict[str, Any]]
    scores: list[np.ndarray]
    reference: dict[str, float]
    target_met: bool
    report: dict[str, Any] = field(default_factory=dict)


def token_share(examples: Sequence[Example], d_vocab: int) -> np.ndarray:
    """Per token id, the share of `examples` whose prompt holds it."""
    held = np.zeros(d_vocab)
    for ex in examples:
        held[np.unique(ex.ids)] += 1
    return held / max(len(examples), 1)


def ranked(scores: list[np.ndarray]) -> np.ndarray:
    """Every feature of every layer (index into the layers' concatenation), highest score first (ties: lower index)."""
    return np.argsort(-np.concatenate(scores), kind="stable")


def select(
    scores: list[np.ndarray],
    chosen: Sequence[int],
    tokens: np.ndarray,
    positions: np.ndarray,
    fill: np.ndarray | None = None,
) -> Selection:
    """The features at `chosen` (indices into the layers' concatenation), per layer; `fill`: the selection's
    `token_fill` (what a left-out token reads as)."""
    chosen = np.asarray(chosen, dtype=np.int64)
    bounds = np.cumsum([0, *map(len, scores)])
    feats = tuple(np.sort(chosen[(chosen >= lo) & (chosen < hi)] - lo) for lo, hi in itertools.pairwise(bounds))
    return Selection(feats, tokens, positions, restrict_attention=True, source="circuit", token_fill=fill)


def token_counts(examples: Sequence[Example], d_vocab: int) -> np.ndarray:
    """Per token id, how many times `examples`' prompts hold it (a mean ablation's weights: `Selection.token_fill`)."""
    return np.bincount(np.concatenate([np.asarray(ex.ids) for ex in examples]), minlength=d_vocab).astype(np.float64)


def smallest_passing(ks: Sequence[int], ok: Callable[[int], bool], bisect_steps: int) -> int | None:
    """The smallest k of the sorted grid `ks` with `ok(k)`, refined by at most `bisect_steps` bisections between it
    and the grid point below (faithfulness is taken as monotone in k); None where no k on the grid passes."""
    good = next((k for k in ks if ok(k)), None)
    if good is None:
        return None
    lo = max([k for k in ks if k < good], default=0)
    for _ in range(bisect_steps):
        if good - lo <= 1:
            break
        mid = (lo + good) // 2
        if ok(mid):
            good = mid
        else:
            lo = mid
    return good


def selection_margin(reference: float, n: int, tolerance: float) -> float:
    """One standard error of an accuracy `reference` measured on `n` prompts, at most half of `tolerance`."""
    return min(float(np.sqrt(max(reference * (1 - reference), 0.0) / max(n, 1))), tolerance / 2)


def extract(
    model: Transformer,
    acg: ACG,
    fit_examples: Sequence[Example],
    eval_examples: dict[str, Sequence[Example]],
    reference: dict[str, float] | None = None,
    tolerance: float = 0.01,
    grid: Sequence[float] = GRID,
    bisect_steps: int = 4,
    name: str = "circuit",
    refine: int | None = 64,
    margin: float | None = None,
    validation: dict[str, Sequence[Example]] | None = None,
    refine_tokens: int | None = 64,
    passes: int = 1,
    block: int = 1,
    token_ablation: str = "zero",
    build: Callable[[ACG, Selection], Transformer] | None = None,
    max_features: int | None = None,
) -> Circuit:
    """The smallest top-k feature set whose pruned replacement model keeps `task_acc` within `tolerance` of `reference`
    (None: the model's own accuracy there) on every task in `eval_examples` (module docstring). Candidates are the
    features with non-zero attribution on `fit_examples` (one that never fired on them scores 0 and adds nothing to a
    top-k); where no k meets the target, `target_met` is False and the target is rebased on all the candidates'
    accuracy where that is lower (`held_to`: the reference each decision then uses, on the eval prompts and on the
    validation prompts alike; None where the target is met). The `refine` least attributed features of the top k (None:
    all of them) are then ablated one at a time, least first, and each is left out where the target still holds, in up
    to `passes` passes over those still kept, until one leaves nothing out (backward elimination: the report's `k_top`
    is the top-k size, `refined_away` how many it left out, `passes` how many passes ran, `trials` how many circuits
    they measured). `block` above 1 lets them go together: after each removal kept the next try takes twice as many
    (up to `block`), after one refused half as many, down to one feature, which is then kept (where most of the top
    k can go, as on testbed-m's code circuit, a run of removable features costs a few evaluations, not one each; where
    most must stay, about what one at a time costs). Before the features, the tokens: those `fit_examples` hold, of
    which the `refine_tokens` rarest (the share of `fit_examples` holding each; None: all of them) are dropped from
    the top k the same way, one at a time, rarest first, each left out where the target still holds (its embedding
    zeroed, it reads as its position alone; with `token_ablation` "mean" it reads as the kept tokens' mean embedding
    under how often `fit_examples` hold each, a mean ablation, and so does every token they never hold; the report's
    `tokens_refined_away`, ids), never the last one. Each decision asks for `task_acc` >= reference - tolerance +
    margin on the eval prompts; `margin` None: per task, `selection_margin` (the report's `margin`).

    `validation` (prompts per task, none of them in `eval_examples`): the elimination's path (the circuit after each
    removal it kept, a run of features left out at one try one step) is checked against them, and the smallest
    circuit on it that holds the same target there too is the result (bisection over the path, taken as monotone; with
    `block` above 1 a scan back from its end, the module docstring says why; the report's `validated`,
    `validation_checks` the circuits measured there, and `refined_away` / `tokens_refined_away` count only the
    removals kept). Where not even the top k holds it there (`validated` False), the result is the smallest on the
    path that loses nothing there against the top k (so a token the validation prompts never hold, whose removal
    costs nothing there, stays left out). Without it the elimination's last circuit is the result.

    `build`: the model each decision and each validation check measures, made from the ACG and a candidate selection
    (None: `replacement_of`, the pruned replacement model). A caller that ships another form of the circuit passes
    it here, so that the elimination judges what is shipped: `backdoor.code_circuit` the round trip with layer 0's
    unused pairs blocked, `acg roundtrip --task --pairs` the checkpoint it writes (a removal the replacement model
    allows can break that form: testbed-s's code circuit read as the mean leaves out `<bos>`, and its blocked round
    trip then falls to code.vars 0.74). Attribution stays on the replacement model.

    `max_features`: a bound on the circuit's features (all layers together; `dense.mlp_feature_budget` turns a share
    of the original's MLP parameters into one). The elimination stops where the target stops it, whatever the size;
    a circuit still over the bound then loses features by `cut_to_budget` (each round leaves out those whose removal
    leaves the most slack over the target on the eval prompts, measured; its first round measures the `refine` least
    attributed, or all with `refine` None, and at least twice as many as are to go) until it fits, whether or not the
    target still holds. The report's `budget` (None without a bound) says the bound, how many features the cut left out
    (`cut`; 0 where the circuit fitted), the circuits it measured (`trials`), whether the result still meets the
    target on the eval prompts (`met`) and on the validation prompts (`validated`, None without them), and
    `k_before`."""
    if refine is not None and refine < 0:
        raise ValueError(f"refine must be >= 0 (features to try leaving out), got {refine}")
    if refine_tokens is not None and refine_tokens < 0:
        raise ValueError(f"refine_tokens must be >= 0 (tokens to try leaving out), got {refine_tokens}")
    if block < 1:
        raise ValueError(f"block must be >= 1 (features tried together), got {block}")
    if passes < 1:
        raise ValueError(f"passes must be >= 1 (rounds of the feature elimination), got {passes}")
    if margin is not None and not 0 <= margin <= tolerance:
        raise ValueError(f"margin must be in [0, tolerance = {tolerance}], got {margin}")
    if token_ablation not in TOKEN_ABLATIONS:
        raise ValueError(f"token_ablation must be one of {', '.join(TOKEN_ABLATIONS)}, got {token_ablation!r}")
    if max_features is not None and max_features < 1:
        raise ValueError(f"max_features must be >= 1 (the most features the circuit may keep), got {max_features}")

    def own_accuracy(examples: dict[str, Sequence[Example]]) -> dict[str, float]:
        return {t: accuracy(answer_logits(model, exs), exs) for t, exs in examples.items()}

    if reference is None:
        reference = own_accuracy(eval_examples)

    def margins_for(reference: dict[str, float], examples: dict[str, Sequence[Example]]) -> dict[str, float]:
        return {
            t: selection_margin(reference[t], len(exs), tolerance) if margin is None else margin
            for t, exs in examples.items()
        }

    margins = margins_for(reference, eval_examples)
    scores, _ = feature_attribution(model, acg, fit_examples)
    total = sum(acg.n_features())
    live = int(sum((s > 0).sum() for s in scores))
    if live == 0:
        raise RoundtripError(f"no feature carries any attribution on the {len(fit_examples)} task prompts")
    share = token_share(fit_examples, acg.cfg.d_vocab)
    tokens = share > 0
    fill = token_counts(fit_examples, acg.cfg.d_vocab) if token_ablation == "mean" else None
    build = build or replacement_of
    longest = max(len(ex.ids) for ex in fit_examples)
    positions = np.arange(acg.cfg.n_ctx) < longest
    cache: dict[int, dict[str, float]] = {}

    def accuracy_of(
        chosen: Sequence[int], examples: dict[str, Sequence[Example]] = eval_examples, kept: np.ndarray = tokens
    ) -> dict[str, float]:
        repl = build(acg, select(scores, chosen, kept, positions, fill))
        return {t: accuracy(answer_logits(repl, exs), exs) for t, exs in examples.items()}

    def measure(k: int) -> dict[str, float]:
        if k not in cache:
            cache[k] = accuracy_of(order[:k])
        return cache[k]

    def slack(acc: dict[str, float], reference: dict[str, float], margins: dict[str, float]) -> float:
        """The worst task's accuracy over what the target asks of it (>= 0: met)."""
        return min(acc[t] - (reference[t] - tolerance + margins[t]) for t in margins)

    def meets(acc: dict[str, float], reference: dict[str, float], margins: dict[str, float]) -> bool:
        return slack(acc, reference, margins) >= 0

    target = reference  # what each decision holds the circuit to (rebased where the candidates miss it)

    def faithful(acc: dict[str, float]) -> bool:
        return meets(acc, target, margins)

    order = ranked(scores)
    ks = sorted({min(live, max(1, round(f * total))) for f in grid} | {live})
    good = smallest_passing(ks, lambda k: faithful(measure(k)), bisect_steps)
    target_met = good is not None
    held_to = None
    if not target_met:  # the candidates together miss it: hold the circuit to what they reach (module docstring)
        target = held_to = lower_of(reference, measure(live))
        margins = margins_for(target, eval_examples)
        good = smallest_passing(ks, lambda k: faithful(measure(k)), bisect_steps) or live
    curve = [{"k": k, "fraction": k / total, "task_acc": cache[k]} for k in sorted(cache)]
    chosen, acc = list(order[:good]), measure(good)
    path = [(chosen, tokens, acc)]  # the circuit (features, tokens) after each removal kept: tokens first
    rarest = [t for t in np.argsort(share, kind="stable") if tokens[t]]  # ties: lower id first
    for token in rarest[: len(rarest) if refine_tokens is None else refine_tokens]:
        kept = path[-1][1].copy()
        kept[token] = False
        if not kept.any():  # as with the features, the last one stays: a circuit reads something
            break
        kept_acc = accuracy_of(chosen, kept=kept)
        if faithful(kept_acc):
            path.append((chosen, kept, kept_acc))
    kept = path[-1][1]
    n_passes = trials = 0
    for _ in range(passes):  # again over those still kept, until a pass leaves nothing out
        n_passes, before = n_passes + 1, len(path)
        still = set(path[-1][0])
        tried = [f for f in order[:good][::-1] if f in still]  # least attributed first
        tried = tried[: len(tried) if refine is None else refine]
        i, size = 0, 1  # the next feature to try, how many to try with it
        while i < len(tried):
            group = tried[i : i + size]
            dropped = set(group)
            trial = [f for f in path[-1][0] if f not in dropped]
            trials += bool(trial)
            trial_acc = accuracy_of(trial, kept=kept) if trial else None
            if trial_acc is not None and faithful(trial_acc):
                path.append((trial, kept, trial_acc))
                i, size = i + len(group), min(2 * size, block)
            elif len(group) > 1:  # try its first half next
                size = len(group) // 2
            else:  # needed: kept
                i += 1
        if len(path) == before:
            break
    chosen, kept, acc = path[-1]
    validated, checks = None, 0  # the circuits on the path measured on the validation prompts
    v_reference = v_margins = None
    if validation is not None:
        v_reference = own_accuracy(validation)
        if held_to is not None:
            v_reference = lower_of(v_reference, accuracy_of(order[:live], validation))
        v_margins = margins_for(v_reference, validation)
        v_cache: dict[int, dict[str, float]] = {}

        def on_validation(i: int) -> dict[str, float]:
            if i not in v_cache:
                v_cache[i] = accuracy_of(path[i][0], validation, path[i][1])
            return v_cache[i]

        scan = block > 1  # a short path (a step per run left out), not monotone there: see the module docstring
        step = last_passing(len(path), lambda i: meets(on_validation(i), v_reference, v_margins), scan)
        validated = step is not None
        if step is None:  # not even the top k holds it there: hold each removal to lose nothing there instead
            top = on_validation(0)
            step = last_passing(len(path), lambda i: all(on_validation(i)[t] >= top[t] for t in top), scan)
        chosen, kept, acc = path[step]
        checks = len(v_cache)
    eliminated = len(chosen)
    budget = None
    if max_features is not None:
        budget = {"max_features": max_features, "k_before": eliminated, "cut": 0, "trials": 0}
        if eliminated > max_features:
            chosen, budget["trials"] = cut_to_budget(  # its first round measures what the elimination tried
                chosen, max_features, lambda c: slack(accuracy_of(c, kept=kept), target, margins), refine
            )
            acc, budget["cut"] = accuracy_of(chosen, kept=kept), eliminated - len(chosen)
        budget["met"] = faithful(acc)
        on_validation = None if validation is None else accuracy_of(chosen, validation, kept)
        budget["validated"] = None if on_validation is None else meets(on_validation, v_reference, v_margins)
    sel = select(scores, chosen, kept, positions, fill)
    sel = dataclasses.replace(sel, source=name, meta={"k": len(chosen), "tolerance": tolerance})
    report = {
        "k": len(chosen),
        "k_top": good,
        "refined_away": good - eliminated,
        "passes": n_passes,
        "block": block,
        "trials": trials,
        "fraction": len(chosen) / total,
        "n_features": sel.n_features(),
        "task_acc": acc,
        "reference": reference,
        "margin": margins,
        "target_met": target_met,
        "held_to": held_to,
        "validated": validated,
        "validation_checks": checks,
        "tokens_kept": int(kept.sum()),
        "tokens_refined_away": np.flatnonzero(tokens & ~kept).tolist(),
        "token_ablation": token_ablation,
        "judged_on": getattr(build, "__name__", type(build).__name__),  # what `build` made: replacement_of by default
        "candidates": live,
        "budget": budget,
    }
    return Circuit(sel, curve, scores, reference, target_met, report)


def cut_to_budget(
    chosen: Sequence[int], max_features: int, slack: Callable[[list[int]], float], first: int | None = None
) -> tuple[list[int], int]:
    """(`chosen` cut to `max_features` features, the circuits measured). Each round measures `slack` (the worst task's
    accuracy over its target, higher is better) of the circuit without each candidate, and leaves out the half of the
    excess (rounded up) whose removals leave the most, ties to the later in `chosen` (the least attributed): a
    removal's cost is measured, not estimated, and measured again after each round, as removals interact. The first
    round's candidates are every feature kept (`first`: the `first` least attributed, and at least twice the excess),
    each later round's the twice as many as are still to go that the last round found cheapest (a removal that cost
    much stays out of reach): on testbed-s's code circuit at 5%, seed 1, 302 -> 254 features in 6 rounds is 394
    circuits, where measuring every feature each round was 1,618."""
    if first is not None and first < 0:
        raise ValueError(f"first must be >= 0 (features the first round measures), got {first}")
    chosen = list(chosen)
    candidates, trials = chosen[::-1], 0  # least attributed first
    if first is not None:
        candidates = candidates[: max(first, 2 * (len(chosen) - max_features))]
    while len(chosen) > max_features:
        excess = len(chosen) - max_features
        left = np.asarray([slack([g for g in chosen if g != f]) for f in candidates])
        trials += len(candidates)
        cheapest = [candidates[i] for i in np.argsort(-left, kind="stable")]
        n = -(-excess // 2)
        dropped = set(cheapest[:n])
        chosen = [f for f in chosen if f not in dropped]
        following = set(cheapest[n : n + 2 * (excess - n)])
        candidates = [f for f in chosen[::-1] if f in following]
    return chosen, trials


def replacement_of(acg: ACG, sel: Selection) -> Transformer:
    """The pruned replacement model of `sel` (what `extract` judges by default)."""
    pruned, _ = prune(acg, sel)
    return to_dense(pruned)


def lower_of(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Per task, the lower of two accuracies."""
    return {t: min(a[t], b[t]) for t in a}


def last_passing(n: int, ok: Callable[[int], bool], scan: bool = False) -> int | None:
    """The largest i < n with `ok(i)`, where `ok` holds up to some point and not after (checked at n - 1 first, then
    at 0, then by bisection); None where `ok(0)` fails. `scan`: no such point is assumed, every i is checked from
    n - 1 down until one holds (None where none does)."""
    if scan:
        return next((i for i in range(n - 1, -1, -1) if ok(i)), None)
    if ok(n - 1):
        return n - 1
    if n == 1 or not ok(0):
        return None
    lo, hi = 0, n - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def n_edges(pruned: ACG, rtol: float = 1e-9) -> dict[str, int]:
    """Edges of the pruned ACG's graph, per read: non-zero virtual weights from sparse sources (tokens, positions,
    transcoder features) into a layer's encoder (one per feature pair), its heads' queries / keys / values (one per
    source and head) and the logits (one per source and token)."""
    from acg.compiler.lower import lower

    graph = lower(pruned, keep_errors=False, dtype="float64")
    out: dict[str, int] = {}
    for name, t in graph.tensors.items():
        if not name.startswith("V."):
            continue
        _, *tag, group = name.split(".")
        if not group.startswith(("tok", "pos", "mlp")):
            continue
        target = ".".join(tag)
        scale = np.abs(t).max() if t.size else 0.0
        live = np.abs(t) > rtol * max(scale, 1e-300)
        if target.endswith((".Q", ".K", ".V")):  # one edge per (source, head), not per head dimension
            live = live.reshape(len(t), pruned.cfg.n_heads, -1).any(-1)
        out[target] = out.get(target, 0) + int(live.sum())
    return out
