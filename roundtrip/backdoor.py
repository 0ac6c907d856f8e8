"""The backdoor-removal experiment: every method on one defender's clean budget, evaluated side by side.

For a testbed model, a clean-data ratio and a seed: draw the budget (`defence.clean_budget`), fit the ACG on it, and
measure `task_acc` per task, `asr` per backdoor family, DER per family and `n_params` for

- `original`; the baselines `FT`, `FP`, `Scratch` (same optimiser steps as the ACG fit: local + end to end);
- `ACG replacement`: every MLP its dictionary, errors dropped (torch);
- `ACG captured (IR)`: the feature-level IR with the `capture` pass at threshold 0 (every QK pair, OV entry, edge,
  token and feature that carried nothing on the budget dropped), compiled with the ONNX backend; not a dense model;
  and, as ablations, the same with only QK pairs, only layer 0's QK pairs, or only OV entries, dropped;
- `roundtrip full`: the dense checkpoint of the captured ACG (features that never fired and tokens never seen
  dropped, attention writes restricted to the kept span);
- `roundtrip full + layer-0 pairs`: the same with layer 0's heads rewritten (wider) to leave out exactly the QK
  pairs the budget never used (`pairs.carry`): the dense form of the layer-0 QK ablation; `... blocked`: those
  pairs' keys kept unattended instead (each scores minus its head's largest |pair score|);
- `roundtrip code`: the dense checkpoint of the `code` circuit (`circuit.extract` on the budget's code prompts);
  its report also holds `math_copy`, its `math.add` accuracy split by whether the answer is in the prompt
  (`evaluate.copy_split`: a circuit that only copies is right on the first part alone); and `roundtrip code +
  layer-0 pairs blocked`, the circuit's round trip with layer 0's unused pairs blocked too;
- `... blocked + FT, confirmed insertions + budget`: each blocked round trip fine-tuned (the FT baseline's recipe and
  steps) on the budget's prompts with 1-3 tokens inserted at random — half the draws tokens the budget never held,
  whose embeddings the round trip dropped (`recipe_tokens`) — less those the captured IR does not answer clean,
  together with the budget itself (`recipe_data`; the code circuit on the code prompts only, and with a `Recipe`'s
  `hold` that many of the other prompts with insertions, labelled with the circuit's own answer on the prompt they
  were made from, `distil.held`, or with `flat` taught an even answer distribution: `flat_held`). The defender
  needs no trigger: the insertions are blind guesses, and the ACG decides which labels to trust.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from acg.compiler.fit import FitSpec, fit
from acg.compiler.lower import lower
from acg.compiler.replacement import replacement_model
from acg.ir.atomic import atomic_file
from acg.ir.passes import get_pass
from acg.roundtrip import circuit, defence, dense
from acg.roundtrip.distil import confirmed_pool, held
from acg.roundtrip.evaluate import copy_split, evaluate
from acg.zoo import vocab
from acg.zoo.registry import UnknownModelError, get, load
from acg.zoo.tasks import BACKDOORS, TASKS, heldout, heldout_pair, resolve_tasks

BASELINES = ("original", "FT", "FP", "Scratch")  # rows that do not need the ACG: saved for a resumed run
PAIRS = " + layer-0 pairs"  # the same round trip with `pairs.carry`: layer 0's never-used QK pairs left out
BLOCKED = " + layer-0 pairs blocked"  # ... and their keys kept unattended (`pairs.carry(block=BLOCK)`)
RECIPE = " + FT, confirmed insertions + budget"  # `distil.confirmed_pool`, then `defence.finetune`
N_INSERT = 16_000  # prompts with insertions drawn for the recipe's fine-tuning (before the IR's confirmation)
BLOCK = 1.0  # a blocked pair scores minus its head's largest |pair score| (README: saturated, float32-exact)
CIRCUIT_EVAL_SEED = 7  # the circuit is selected on these held-out prompts; the table is measured on seed 0's
REFINE_TOKENS = 64  # the code circuit's elimination tries leaving out the 64 rarest tokens of the code prompts
# The code circuit's defaults, each the one that met the issue's targets (docs/backdoor-record.md, "Judged on what
# ships, held off the task", and the README's table): up to 64 features left out at a try, a left-out token read as
# the kept tokens' mean, each decision judged on the blocked round trip, and its recipe holding 16,000 prompts outside
# its task to the circuit's own answers and its own block outputs on the budget's code prompts at weight 0.3 (on the
# Intel machine's fits the anchor brought 1%'s code.brackets within a point on every seed and kept 5%'s; on the AMD
# machine's it narrowed the 1% gap without closing it on every seed: README).
CIRCUIT_BLOCK = 64
CIRCUIT_ABLATION = "mean"
CIRCUIT_JUDGE = "blocked"
CODE_HOLD = 16_000
CODE_ANCHOR = 0.3
# The bound on the code circuit's MLP parameters, as a share of the original's: a circuit the elimination
# leaves larger is cut to fit (`circuit.cut_to_budget`), whether or not its target still holds (its report says).
CIRCUIT_MAX_MLP = 0.25


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the RECIPE fine-tunes a round trip: `n_insert` prompts of the budget drawn with `recipe_tokens` inserted,
    kept where the captured IR answers clean (`recipe_data`), then the budget; trained at `lr`, with `soft` the
    weight of the IR's answer distribution against the labels on the prompts with insertions (`recipe_targets`; 0:
    the labels alone), `unseen` the share of `soft` kept on the prompts whose insertions hold a token the ACG's
    fitting corpus never held (`never_seen`; 1: the same weight, 0: their labels alone), `seen` the share kept on
    the other insertions (the same; with `seen` 0 the soft targets go on the never-seen insertions alone) and
    `anchor` the weight that holds the start's own block outputs on the budget's clean prompts (`anchor_kw`; 0:
    none). A task circuit's recipe also trains on `hold` prompts outside its task with insertions, labelled with
    the circuit's own answer without them (`with_held`; 0: none), or with `flat` taught an even answer distribution
    there instead, at full weight (`flat_held`: no answer at all where the circuit is meant to have lost the task),
    and anchors at `code_anchor` where given (None: at `anchor`, as the full round trip; `scoped`).
    `keep_out`: the embeddings of the tokens the round trip left out stay zero through the fine-tuning (`keep_out_kw`:
    they read as their position alone, as in the round trip; otherwise the insertions train them). The defaults are
    the RECIPE's; a value out of range, or one that needs another (a share without a soft weight, `flat` without
    held prompts), is refused when the recipe is made, before any work."""

    n_insert: int = N_INSERT
    lr: float = defence.FT_LR
    soft: float = 0.0
    anchor: float = 0.0
    hold: int = 0
    unseen: float = 1.0
    flat: bool = False
    seen: float = 1.0
    keep_out: bool = False
    code_anchor: float | None = None

    def __post_init__(self) -> None:
        if self.n_insert < 0:
            raise ValueError(f"the number of prompts with insertions must be >= 0, got {self.n_insert}")
        if not 0 < self.lr < float("inf"):
            raise ValueError(f"the learning rate must be a finite number > 0, got {self.lr}")
        if not 0 <= self.soft <= 1:
            raise ValueError(f"the soft-target weight must be in [0, 1], got {self.soft}")
        for share, where in self.shares:
            if not 0 <= share <= 1:
                raise ValueError(f"the share of the soft weight on {where} insertions must be in [0, 1], got {share}")
            if share != 1 and not self.soft:
                raise ValueError(f"a share of the soft weight ({share:g}) needs a soft weight: the labels have none")
        for weight in (self.anchor, self.code_anchor):
            if weight is not None and not 0 <= weight < float("inf"):
                raise ValueError(f"the anchor weight must be a finite number >= 0, got {weight}")
        if self.hold < 0:
            raise ValueError(f"the number of prompts held outside the task must be >= 0, got {self.hold}")
        if self.flat and not self.hold:
            raise ValueError("a flat answer distribution is taught on held prompts: it needs some (hold > 0)")

    def scoped(self, scope: str) -> Recipe:
        """The recipe one scope's rows train by: a task circuit's ("code") with `code_anchor` as its anchor where
        given; the full round trip's without the held prompts (it has no task to hold them off)."""
        if scope == "code":
            anchor = self.anchor if self.code_anchor is None else self.code_anchor
            return dataclasses.replace(self, anchor=anchor, code_anchor=None)
        return dataclasses.replace(self, hold=0, flat=False, code_anchor=None)

    @property
    def shares(self) -> tuple[tuple[float, str], ...]:
        """The soft weight's shares and the insertions each goes on: (`unseen`, "never-seen"), (`seen`, "seen")."""
        return (self.unseen, "never-seen"), (self.seen, "seen")

    @property
    def name(self) -> str:
        """What a row fine-tuned so adds to its name, for each of lr, soft, unseen, seen, anchor, hold, flat and
        keep_out that is not the RECIPE's: ", lr X", ", soft W", " (U on never-seen, S on seen)", ", anchor A",
        ", N held off-task", " flat", ", left-out tokens kept out"."""
        rate = "" if self.lr == defence.FT_LR else f", lr {self.lr:g}"
        soft = f", soft {self.soft:g}" if self.soft else ""
        shares = [f"{v:g} on {where}" for v, where in self.shares if v != 1]
        soft += f" ({', '.join(shares)})" if shares else ""
        anchor = f", anchor {self.anchor:g}" if self.anchor else ""
        held = (f", {self.hold} held off-task" if self.hold else "") + (" flat" if self.flat else "")
        return rate + soft + anchor + held + (", left-out tokens kept out" if self.keep_out else "")

    def finetune_kw(
        self,
        taught: Any,
        data: Sequence[Any],
        report: dict[str, Any],
        never: Collection[int] | None = None,
        kept: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """`defence.finetune`'s keywords for this recipe on `recipe_data`'s three (`data`, its `report` and the
        captured IR's logits `taught`): the rate, the soft targets `recipe_targets` makes of `taught` weighted by
        `soft` (none where `soft` is 0 or there are no insertions; `unseen` of it on the insertions that hold one of
        the token ids `never`, the ACG's `never_seen`, `seen` of it on the others: a recipe with either share below 1
        needs the tokens), with `flat` an even answer distribution on the held prompts (`flat_held`), the anchor
        on the budget's prompts, and with `keep_out` the token embeddings outside `kept` (the round trip's token mask,
        a bool per token id) held at zero (`keep_out_kw`)."""
        shared = [v for v, _ in self.shares if v != 1]
        if self.soft and shared and never is None:
            raise ValueError(f"a share of {shared[0]:g} of the soft weight needs the never-seen token ids (never_seen)")
        targets = None
        if self.soft:
            targets = recipe_targets(taught, data, report, () if never is None else never, self.unseen, self.seen)
        soft = weighted(targets, self.soft)
        if self.flat:
            soft = flat_held(soft, report, vocab.D_VOCAB if taught is None else taught.shape[1])
        out = {"lr": self.lr, **soft, **anchor_kw(report, self.anchor)}
        if self.keep_out:
            if kept is None:
                raise ValueError("keeping left-out tokens out needs the round trip's token mask (kept)")
            out.update(keep_out_kw(kept))
        return out


def blocked_roundtrip(acg, log: Callable[[str], None]) -> tuple[Any, Any, dict] | None:
    """`dense.roundtrip` of the captured ACG with layer 0's never-used QK pairs blocked, or None (the reason logged)
    where the model's shape does not allow it (`roundtrip/pairs.py`: more live rows than dimensions, no centring
    norm, no pair statistics)."""
    try:
        return dense.roundtrip(acg, dense.select_captured(acg), block=BLOCK)
    except dense.RoundtripError as e:
        log(f"no round trip with layer 0's pairs blocked: {e}")
        return None


def never_seen(acg) -> np.ndarray:
    """The token ids the ACG's fitting corpus never held (the round trip drops their embeddings)."""
    return np.flatnonzero(acg.usage["tok_count"] == 0)


def recipe_tokens(acg) -> np.ndarray:
    """The token ids the recipe's insertions draw from (uniformly, with repeats): every token the ACG's fitting
    corpus held once, and the ones it never held (`never_seen`) repeated so that they make up about half the draws: a
    dropped token reads as nothing but its position, and the checkpoint learns to let such a position change
    nothing."""
    seen = np.flatnonzero(acg.usage["tok_count"] > 0)
    never = never_seen(acg)
    if len(never) == 0:
        return seen
    return np.concatenate([seen, np.tile(never, max(1, len(seen) // len(never)))])


@contextmanager
def compiled_teacher(acg) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
    """The RECIPE's teacher: the captured IR with everything dropped (`captured_ir`), compiled into a temporary
    directory that lives as long as the context."""
    graph = lower(acg, keep_errors=False, dtype="float32", usage=True, qk_tables=True)
    with tempfile.TemporaryDirectory(prefix="acg-capture-") as tmp:
        fn, _ = captured_ir(graph, (), tmp)
        yield fn


def recipe_data(
    acg, budget: Sequence[Any], n_insert: int = N_INSERT, seed: int = 0, teacher: Any = None
) -> tuple[list[Any], dict[str, Any], np.ndarray | None]:
    """The RECIPE's fine-tuning data (`distil.confirmed_pool`): `n_insert` prompts of `budget` with `recipe_tokens`
    inserted, kept where the captured IR (`captured_ir` with everything dropped; compiled here unless `teacher` is
    given) answers clean, followed by `budget` itself; its report (with `n_never_seen`: how many of the insertions
    kept hold a token the fit never saw, which `Recipe.unseen` weighs); and the captured IR's answer logits on the
    prompts with insertions kept (None for no insertions), which `recipe_targets` teaches."""
    if teacher is None:
        with compiled_teacher(acg) as fn:
            return recipe_data(acg, budget, n_insert, seed, teacher=fn)
    data, report, taught = confirmed_pool(budget, teacher, recipe_tokens(acg), n_insert, seed, acg.cfg.n_ctx)
    report["n_never_seen"] = int(holding(data[: n_inserted(report)], never_seen(acg)).sum())
    return data, report, taught


def holding(examples: Sequence[Any], tokens: Collection[int]) -> np.ndarray:
    """Which of `examples` hold any of the token ids `tokens` in their prompt (a bool per example)."""
    tokens = {int(t) for t in tokens}
    return np.array([not tokens.isdisjoint(ex.ids) for ex in examples], dtype=bool)


def n_inserted(report: dict[str, Any]) -> int:
    """How many of `recipe_data`'s examples (as `with_held` may have extended them) are the confirmed insertions
    that come first: all but the budget and any held prompts."""
    return report["n"] - report["n_budget"] - report.get("n_held", 0)


def recipe_targets(
    taught: Any,
    data: Sequence[Any],
    report: dict[str, Any],
    never: Collection[int] = (),
    unseen: float = 1.0,
    seen: float = 1.0,
) -> tuple[Any, Any] | None:
    """Soft targets for the RECIPE's fine-tuning (`zoo.train.train`): `taught`, the captured IR's answer logits on
    the prompts with insertions of `data` (`recipe_data`'s three: they come first, computed when the IR confirmed
    them), set in rows of `data`'s length, and where they apply: on those prompts `unseen` where they hold any of
    the token ids `never` and `seen` elsewhere (`Recipe.unseen`, `Recipe.seen`; 1 and 1: everywhere), 0 on any held
    ones (`with_held`: labelled by the start itself) and on the budget (its labels are the clean answers, taught as they
    are; its rows of logits are 0: on testbed-m's 5% budget that is 76,800 of 90,705 prompts). `weighted` scales
    them by the recipe's `soft`: 1 teaches the IR's whole answer distribution where it confirmed the clean answer, 0
    its argmax. None where there are no insertions: nothing to teach."""
    import torch

    n_insert = n_inserted(report)
    n_taught = 0 if taught is None else len(taught)
    if not 0 <= n_insert <= len(data) or report["n"] != len(data) or n_taught != n_insert:
        raise ValueError(
            f"the recipe report ({report}) and {n_taught} rows of logits do not describe these {len(data)} examples"
        )
    if not n_insert:
        return None
    logits = torch.zeros(len(data), taught.shape[1])
    logits[:n_insert] = torch.as_tensor(taught, dtype=torch.float32)
    at_insertions = torch.zeros(len(data))
    at_insertions[:n_insert] = 1.0
    if unseen != 1 or seen != 1:
        never_there = torch.from_numpy(holding(data[:n_insert], never))
        at_insertions[:n_insert] = torch.where(never_there, unseen, seen)
    return logits, at_insertions


def weighted(targets: tuple[Any, Any] | None, soft: float) -> dict[str, Any]:
    """`defence.finetune`'s keywords for `recipe_targets`' `targets` at weight `soft` (none for 0, or for no
    targets)."""
    if not soft or targets is None:
        return {}
    logits, at_insertions = targets
    return {"soft_targets": logits, "soft_weight": soft * at_insertions}


def flat_held(soft: dict[str, Any], report: dict[str, Any], d_vocab: int) -> dict[str, Any]:
    """`weighted`'s keywords (`soft`; empty for the labels alone) with the held prompts `report` counts (`with_held`:
    between the confirmed insertions and the budget) taught an even answer distribution over the `d_vocab` tokens at
    weight 1 (equal logits; their labels, the start's own answers, are not taught): a task circuit is taught to give
    no answer at all outside its task, whatever is inserted there. The other rows keep their targets and weights."""
    import torch

    n_held = report.get("n_held", 0)
    if not n_held:
        raise ValueError("a flat answer distribution is taught on held prompts, and the report holds none")
    n, start = report["n"], n_inserted(report)
    logits = soft["soft_targets"].clone() if soft else torch.zeros(n, d_vocab)
    weight = soft["soft_weight"].clone() if soft else torch.zeros(n)
    logits[start : start + n_held] = 0.0
    weight[start : start + n_held] = 1.0
    return {"soft_targets": logits, "soft_weight": weight}


def keep_out_kw(kept: np.ndarray) -> dict[str, Any]:
    """`defence.finetune`'s keywords that keep the token embeddings outside `kept` (a bool per token id: the round
    trip's `Selection.tokens`) at zero through the fine-tuning: the token embedding's rows multiplied by the mask after
    every step."""
    import torch

    return {"masks": {"embed.W_E": torch.as_tensor(np.asarray(kept, dtype=np.float32))[:, None]}}


def anchor_kw(report: dict[str, Any], anchor: float) -> dict[str, Any]:
    """`defence.finetune`'s keywords for the RECIPE with the starting checkpoint's computation held at weight
    `anchor` (a `Recipe`'s, checked there) on the budget's clean prompts (they come last in `recipe_data`, described
    by its `report`), the prompts with insertions left free to change (`zoo.train.train`'s anchor); none for 0."""
    import torch

    if not anchor:
        return {}
    on = torch.zeros(report["n"], dtype=torch.bool)
    on[report["n"] - report["n_budget"] :] = True
    return {"anchor_weight": anchor, "anchor_on": on}


def with_held(
    start: Any,
    data: list[Any],
    report: dict[str, Any],
    outside: Sequence[Any],
    tokens: Any,
    n: int,
    seed: int,
    n_ctx: int,
) -> tuple[list[Any], dict[str, Any]]:
    """`recipe_data`'s `data` and `report` with `n` prompts of `outside` (the budget's prompts outside a task
    circuit's task) with `tokens` inserted, labelled with `start`'s own answer on the prompt each was made from
    (`distil.held`), set between the confirmed insertions and the budget (so that `recipe_targets` and `anchor_kw`
    find theirs where they were); the report counts them (`n_held`)."""
    if not n:
        return data, report
    if not outside:
        raise ValueError("no prompts outside the task to hold")
    extra = held(start, outside, tokens, n, seed, n_ctx)
    at = n_inserted(report)
    more = {"n": report["n"] + len(extra), "n_held": report.get("n_held", 0) + len(extra)}
    return data[:at] + extra + data[at:], {**report, **more}


def measure(candidate: Any, n: int, n_trig: int) -> dict[str, Any]:
    """task_acc per task on `n` held-out prompts each, asr per family on `n_trig` triggered prompts per task (and
    per family and task: `asr_by_task`), the target's rate on the same prompts without their trigger
    (`untriggered`, `untriggered_by_task`: what the trigger adds is the asr above it) and with part of it only
    (`false_trigger`, `false_trigger_by_task`: `conj`'s tokens alone, `phrase`'s run broken; None for `token`)."""
    e = evaluate(candidate, n=n, n_backdoor_per_task=n_trig)
    keep = ("task_acc", "asr", "asr_by_task", "untriggered", "untriggered_by_task")
    keep += ("false_trigger", "false_trigger_by_task")
    return {k: e[k] for k in keep}


def captured_ir(
    graph, kinds: tuple[str, ...], tmp: str, weights: tuple[str, ...] = ()
) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """The captured feature-level IR compiled to ONNX (fast to evaluate), and the capture pass's report."""
    from acg import codegen

    result = get_pass("capture", threshold=0.0, kinds=kinds, weights=weights)(graph)
    codegen.compile(result.graph, f"{tmp}/onnx", backend="onnx")
    return codegen.load(f"{tmp}/onnx"), result.report


def blocked_circuit(acg, sel: dense.Selection):
    """The round trip of `sel` with layer 0's unused pairs blocked (the code circuit's blocked row), as
    `circuit.extract`'s `build`."""
    return dense.roundtrip(acg, sel, True, BLOCK)[0]


# which of the code circuit's round trips its elimination measures: the `build` each name gives `circuit.extract`
JUDGES = {"plain": None, "blocked": blocked_circuit}


def code_circuit(
    model,
    acg,
    budget,
    n_fit: int = 2000,
    n_eval: int = 1000,
    tolerance: float = 0.01,
    refine_tokens: int = REFINE_TOKENS,
    block: int = CIRCUIT_BLOCK,
    token_ablation: str = CIRCUIT_ABLATION,
    judge: str = CIRCUIT_JUDGE,
    max_mlp: float | None = CIRCUIT_MAX_MLP,
):
    """The `code` circuit: attributed on the budget's code prompts, selected on held-out prompts (seed
    CIRCUIT_EVAL_SEED), the `refine_tokens` rarest tokens of the code prompts and every top-k feature tried by the
    elimination (up to `block` at a try, `circuit.extract`; a token left out reads as `token_ablation` says), whose
    path is validated on other held-out prompts (the next seed's, less any the selection holds). `judge`: which round
    trip each decision measures, "plain" (the pruned replacement model, which the plain round trip computes) or
    "blocked" (`blocked_circuit`: layer 0's unused pairs blocked too). `max_mlp`: the most MLP parameters it may keep,
    as a share of the original's (`dense.mlp_feature_budget`; None: no bound)."""
    if judge not in JUDGES:
        raise ValueError(f"judge must be one of {', '.join(JUDGES)}, got {judge!r}")
    tasks = resolve_tasks("code")
    fit_examples = [ex for ex in budget if ex.task in tasks][:n_fit]
    eval_examples, validation = heldout_pair(tasks, n_eval, CIRCUIT_EVAL_SEED)
    return circuit.extract(
        model,
        acg,
        fit_examples,
        eval_examples,
        None,
        tolerance,
        name="circuit:code",
        refine=None,
        validation=validation,
        refine_tokens=refine_tokens,
        block=block,
        token_ablation=token_ablation,
        build=JUDGES[judge],
        max_features=None if max_mlp is None else dense.mlp_feature_budget(model, acg, max_mlp),
    )


def run(
    name: str,
    ratio: float = 0.05,
    seed: int = 0,
    n_eval: int = 1000,
    n_trig: int = 200,
    steps: int | None = None,
    fit_spec: FitSpec | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda s: None,
    device: str = "cpu",
    threads: int = 2,
    resume: Path | None = None,
    recipe: Recipe | None = Recipe(hold=CODE_HOLD, code_anchor=CODE_ANCHOR),
    refine_tokens: int = REFINE_TOKENS,
    code_only: bool = False,
    circuit_block: int = CIRCUIT_BLOCK,
    circuit_ablation: str = CIRCUIT_ABLATION,
    circuit_judge: str = CIRCUIT_JUDGE,
    circuit_max_mlp: float | None = CIRCUIT_MAX_MLP,
) -> dict[str, Any]:
    """One budget, every method; `rows[method]` holds task_acc, asr, der, n_params, seconds. `device` trains the
    baselines there (the ACG fit runs on the CPU with `threads`). With `resume`, each baseline's row (original, FT,
    FP, Scratch) is saved there as soon as it is measured and taken from there by a later run of the same budget,
    seed, steps and evaluation sizes: a run stopped in the ACG stage does not train its baselines again. `recipe`:
    how the RECIPE rows fine-tune (the RECIPE's own by default), named in them (`Recipe.name`) where it differs;
    None: no RECIPE rows. `code_only`: the rows the code circuit needs alone (original, ACG replacement, the code
    circuit's round trips, and with a recipe `ACG captured (IR)`, its teacher): no baselines, no ablations, no full
    round trips (testbed-m seed 0 without a recipe: 41 minutes here, 29 of them the circuit's extraction).
    `refine_tokens`: how many of the code prompts' rarest tokens the code circuit's elimination tries leaving out
    (`code_circuit`), named in its rows (`circuit_tag`) where it differs from REFINE_TOKENS; `circuit_block`: up to
    how many top-k features one try of its elimination leaves out (`circuit.extract`'s `block`); `circuit_ablation`:
    what a token it leaves out reads as (`circuit.extract`'s `token_ablation`); `circuit_judge`: which of its round
    trips the elimination measures (`code_circuit`'s `judge`); `circuit_max_mlp`: the share of the original's MLP
    parameters it may keep (`code_circuit`'s `max_mlp`); each named there where it is not the default
    (CIRCUIT_BLOCK, CIRCUIT_ABLATION, CIRCUIT_JUDGE, CIRCUIT_MAX_MLP; the default recipe holds CODE_HOLD prompts off
    the code task and anchors the code circuit at CODE_ANCHOR, each said in the recipe row's name: `Recipe.scoped`).
    A recipe that keeps left-out tokens at zero (`keep_out`) with a mean ablation, which reads them as the mean token,
    is refused before any work, as is an unknown ablation or judge, or an MLP share outside (0, 1]."""
    if recipe is not None and recipe.keep_out and circuit_ablation != "zero":
        raise ValueError("keep_out holds left-out tokens at zero; a mean ablation reads them as the mean token")
    if circuit_ablation not in circuit.TOKEN_ABLATIONS:
        raise ValueError(f"circuit_ablation must be one of {', '.join(circuit.TOKEN_ABLATIONS)}: {circuit_ablation!r}")
    if circuit_judge not in JUDGES:
        raise ValueError(f"circuit_judge must be one of {', '.join(JUDGES)}: {circuit_judge!r}")
    if circuit_max_mlp is not None and not 0 < circuit_max_mlp <= 1:
        raise ValueError(
            f"circuit_max_mlp must be a share in (0, 1] of the original's MLP parameters or None: {circuit_max_mlp}"
        )
    zoo = get(name)
    model = load(name)
    spec = fit_spec or FitSpec(seed=seed, threads=threads)
    steps = steps or spec.steps + spec.e2e_steps
    budget = defence.clean_budget(zoo.train, ratio, seed)
    base = dataclasses.replace(zoo.train, threads=threads)  # the baselines and the recipe train on `threads` too
    rows: dict[str, dict[str, Any]] = {}
    extra: dict[str, Any] = {"n_budget": len(budget), "steps": steps, "device": device, "threads": threads}

    key = {"model": name, "ratio": ratio, "seed": seed, "steps": steps, "n_eval": n_eval, "n_trig": n_trig}
    saved = json.loads(resume.read_text()) if resume is not None and resume.exists() else {}
    if saved.get("key") != key:
        saved = {"key": key, "rows": {}}

    def reused(method: str) -> bool:
        if method not in saved["rows"]:
            return False
        rows[method] = saved["rows"][method]
        log(f"{name} ratio {ratio} seed {seed}: {method} (measured before, from {resume})")
        return True

    def add(method: str, candidate: Any, seconds: float, n_params: int | None, **more: Any) -> None:
        t = time.perf_counter()
        rows[method] = {**measure(candidate, n_eval, n_trig), "n_params": n_params, "seconds": seconds, **more}
        log(f"{name} ratio {ratio} seed {seed}: {method} ({seconds:.0f} s + {time.perf_counter() - t:.0f} s eval)")
        if resume is not None and method in BASELINES:
            saved["rows"][method] = rows[method]
            with atomic_file(resume) as f:
                f.write(json.dumps(saved, indent=1, default=float) + "\n")

    def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    if not reused("original"):
        add("original", model, 0.0, dense.n_params(model)["n_params"])
    kw = {"progress": progress, "device": device}
    baselines = {  # how each trains, and the key of what it returns beside the model (None: the model alone)
        "FT": (defence.finetune_recorded, "training"),
        "FP": (defence.fine_prune, "report"),
        "Scratch": (defence.scratch, None),
    }
    for method, (train, key_of) in ({} if code_only else baselines).items():
        if reused(method):
            continue
        out, s = timed(lambda train=train: train(model, base, budget, steps, seed, **kw))
        trained, more = out if key_of else (out, {})
        add(method, trained, s, dense.n_params(trained)["n_params"], **({key_of: more} if key_of else {}))
    (acg, stats), s = timed(lambda: fit(model, [ex.ids for ex in budget], spec, progress=progress))
    extra["fit"] = {"seconds": stats["seconds"], "layers": stats["layers"]}
    add("ACG replacement", replacement_model(model, acg.transcoders), s, dense.n_params(acg)["n_params"])
    ablations = (
        ("ACG captured (IR)", (), ()),
        ("- QK pairs only", ("qk",), ()),
        ("- layer-0 QK pairs only", ("qk",), ("T.L0",)),
        ("- OV entries only", ("ov",), ()),
    )
    if code_only:  # the captured IR only as the code recipe's teacher
        ablations = ablations[:1] if recipe is not None else ()
    # lowered once (where any row needs it), captured once per row below
    tables = lower(acg, keep_errors=False, dtype="float32", usage=True, qk_tables=True) if ablations else None
    code_tasks = resolve_tasks("code")
    code_budget = [ex for ex in budget if ex.task in code_tasks]
    off_code = [ex for ex in budget if ex.task not in code_tasks]
    # per scope: fine-tuning data, its report, the IR's logits on it, seconds; made while the captured IR is here
    made_for: dict[str, tuple[list, dict, Any, float]] = {}
    for method, kinds, weights in ablations:
        with tempfile.TemporaryDirectory(prefix="acg-capture-") as tmp:
            (fn, rep), s = timed(lambda kinds=kinds, tmp=tmp, weights=weights: captured_ir(tables, kinds, tmp, weights))
            add(method, fn, s, None, capture=rep["by_kind"])
            if method == "ACG captured (IR)" and recipe is not None:
                scopes = (("code", code_budget),) if code_only else (("full", budget), ("code", code_budget))
                for scope, part in scopes:
                    (data, made, taught), s = timed(lambda p=part, f=fn: recipe_data(acg, p, recipe.n_insert, seed, f))
                    made_for[scope] = (data, made, taught, s)

    def tuned(start, scope: str, report: dict[str, Any], kept: np.ndarray, tag: str = "") -> None:
        data, data_report, taught, s = made_for[scope]
        named = recipe.scoped(scope)  # the full: nothing held; the code circuit: its own anchor
        if named.hold:  # the other tasks' prompts with insertions, held to the circuit's own answers
            hold = (start, data, data_report, off_code, recipe_tokens(acg), named.hold, seed, acg.cfg.n_ctx)
            (data, data_report), s_held = timed(lambda: with_held(*hold))
            s += s_held  # the row's seconds count the start's labelling of them too
        how = named.finetune_kw(taught, data, data_report, never_seen(acg), kept)
        (ft, trained), s2 = timed(lambda: defence.finetune_recorded(start, base, data, steps, seed, **kw, **how))
        method = f"roundtrip {scope}{tag}{BLOCKED}{RECIPE}{named.name}"
        more = {**report, "finetune": {**data_report, "training": trained}}
        add(method, ft, s + s2, dense.n_params(ft)["n_params"], report=more)

    captured = dense.select_captured(acg)  # every full round trip's selection, and its token mask for the recipe
    full = () if code_only else (("", False, None), (PAIRS, True, None), (BLOCKED, True, BLOCK))
    for suffix, pairs, block in full:
        (rt, _, report), s = timed(lambda p=pairs, b=block: dense.roundtrip(acg, captured, p, b))
        add("roundtrip full" + suffix, rt, s, report["n_params"], report=report)
        if block is not None and recipe is not None:
            tuned(rt, "full", report, captured.tokens)
    # selected on as many prompts as measured
    how = {"n_eval": n_eval, "refine_tokens": refine_tokens, "block": circuit_block}
    how.update(token_ablation=circuit_ablation, judge=circuit_judge, max_mlp=circuit_max_mlp)
    circ, s = timed(lambda: code_circuit(model, acg, budget, **how))
    mlp = dense.n_params(model)["n_params_mlp"]  # the original's: each code row's MLP share
    tag = circuit_tag(refine_tokens, circuit_block, circuit_ablation, circuit_judge, circuit_max_mlp)
    edges = None  # the same pruned circuit for both rows: counted once
    for suffix, pairs, block in (("", False, None), (BLOCKED, True, BLOCK)):
        (rt_code, pruned, report), s2 = timed(lambda p=pairs, b=block: dense.roundtrip(acg, circ.selection, p, b))
        edges = circuit.n_edges(pruned) if edges is None else edges
        report.update(circuit=circ.report, curve=circ.curve, n_edges=edges, mlp_share=report["n_params_mlp"] / mlp)
        report["math_copy"] = copy_split(rt_code, heldout("math.add", n_eval, 0))  # adds, or copies? (circuit_copy)
        add("roundtrip code" + tag + suffix, rt_code, s + s2, report["n_params"], report=report)
        if block is not None and recipe is not None:
            tuned(rt_code, "code", report, circ.selection.tokens, tag)
    add_der(rows)
    return {"model": name, "ratio": ratio, "seed": seed, "rows": rows, **extra}


def circuit_tag(
    refine_tokens: int,
    block: int = CIRCUIT_BLOCK,
    token_ablation: str = CIRCUIT_ABLATION,
    judge: str = CIRCUIT_JUDGE,
    max_mlp: float | None = CIRCUIT_MAX_MLP,
) -> str:
    """What the code circuit's rows add to their name for each choice other than the defaults: a token elimination
    other than REFINE_TOKENS's, another block of features a try, left-out tokens zeroed (or read as the mean, where
    that is not the default), an elimination judged on another round trip, another bound on its MLP (or none)."""
    tag = ""
    if refine_tokens != REFINE_TOKENS:
        tag = " (every code token kept)" if refine_tokens == 0 else f" ({refine_tokens} rarest code tokens tried)"
    if block != CIRCUIT_BLOCK:
        tag += " (one feature a try)" if block == 1 else f" (up to {block} features a try)"
    if token_ablation != CIRCUIT_ABLATION:
        read = "zeroed" if token_ablation == "zero" else f"read as the {token_ablation}"
        tag += f" (left-out tokens {read})"
    tag += f" (judged {judge})" if judge != CIRCUIT_JUDGE else ""
    if max_mlp != CIRCUIT_MAX_MLP:
        tag += " (no MLP bound)" if max_mlp is None else f" (MLP <= {max_mlp * 100:g}%)"
    return tag


_L0_QK = ("blocks.0.attn.W_Q", "blocks.0.attn.W_K", "blocks.0.attn.b_Q", "blocks.0.attn.b_K")
_EMBED = ("embed.W_E", "pos_embed.W_pos")
FREEZE_SETS: dict[str, tuple[str, ...]] = {  # `freeze_run`'s parameter sets; names a model lacks are passed over
    "nothing": (),
    "layer-0 QK": _L0_QK,
    "embeddings": _EMBED,
    "token embeddings": _EMBED[:1],
    "position embeddings": _EMBED[1:],
    "layer-0 table": (*_EMBED, "blocks.0.ln1.w", "blocks.0.ln1.b", *_L0_QK),  # what layer 0's scores are made of
}


def freeze_run(
    name: str,
    ratio: float = 0.01,
    seed: int = 0,
    n_eval: int = 1000,
    n_trig: int = 200,
    sets: dict[str, tuple[str, ...]] | None = None,
    steps: int | None = None,
    fit_spec: FitSpec | None = None,
    log: Callable[[str], None] = lambda s: None,
    threads: int = 2,
    recipes: Sequence[Recipe] = (Recipe(),),
) -> dict[str, Any]:
    """The full ACG's blocked round trip fine-tuned by the RECIPE (as `run` does it: same budget, fit, data and steps)
    with each of `sets` (default FREEZE_SETS) left untrained, by each of `recipes` (one data set: they share `n_insert`;
    the rate, soft-target and anchor weights vary): one row per set and recipe ("recipe FT, SET frozen" and the recipe's
    `name`; its `frozen` lists the names the model has, its `lr`, `soft`, `unseen`, `seen`, `anchor` and `keep_out` the
    recipe's), beside `original` and the blocked round trip itself; DER per family against the original. Layer 0's
    attention scores are where `pairs.carry` blocks the pairs the budget never used: which of their parameters the
    recipe must train to take a pathway out, and which training costs a task, is what the rows tell apart; the rate, how
    far the fine-tuning may move what it trains; the soft targets, whether the IR's whole answer distribution keeps the
    tasks its argmax costs; the anchor, whether holding the clean prompts' computation keeps them while the insertions
    take the pathway out. Recipes that do not share `n_insert`, or share a name, or hold prompts outside a task or
    anchor a task circuit (the full round trip has neither), are refused before any work."""
    if len({r.n_insert for r in recipes}) != 1 or len({r.name for r in recipes}) != len(recipes):
        raise ValueError(f"the recipes must share n_insert (one data set) and differ in name: {list(recipes)}")
    if any(r.hold or r.code_anchor is not None for r in recipes):
        raise ValueError(
            "the full round trip has no prompts outside its task to hold and no task circuit to anchor: a recipe's "
            "hold must be 0 and its code_anchor None here"
        )
    zoo, model = get(name), load(name)
    spec = fit_spec or FitSpec(seed=seed, threads=threads)
    steps = steps or spec.steps + spec.e2e_steps
    budget = defence.clean_budget(zoo.train, ratio, seed)
    base = dataclasses.replace(zoo.train, threads=threads)
    rows: dict[str, dict[str, Any]] = {}

    def add(method: str, candidate: Any, seconds: float, **more: Any) -> None:
        t = time.perf_counter()
        n_params = dense.n_params(candidate)["n_params"]
        rows[method] = {**measure(candidate, n_eval, n_trig), "n_params": n_params, "seconds": seconds, **more}
        log(f"{name} ratio {ratio} seed {seed}: {method} ({seconds:.0f} s + {time.perf_counter() - t:.0f} s eval)")

    add("original", model, 0.0)
    t = time.perf_counter()
    acg, stats = fit(model, [ex.ids for ex in budget], spec)
    captured = dense.select_captured(acg)
    rt, _, report = dense.roundtrip(acg, captured, block=BLOCK)
    add("roundtrip full" + BLOCKED, rt, time.perf_counter() - t, report=report)
    t = time.perf_counter()
    with compiled_teacher(acg) as teacher:
        data, data_report, taught = recipe_data(acg, budget, recipes[0].n_insert, seed, teacher=teacher)
    labelled = time.perf_counter() - t
    log(f"{name} ratio {ratio} seed {seed}: recipe data {data_report} ({labelled:.0f} s)")
    have = {n for n, _ in rt.named_parameters()}
    fields = ("lr", "soft", "unseen", "seen", "anchor", "keep_out")  # what each row records of its recipe
    for label, names in (FREEZE_SETS if sets is None else sets).items():
        frozen = [n for n in names if n in have]
        for recipe in recipes:
            t = time.perf_counter()
            how = recipe.finetune_kw(taught, data, data_report, never_seen(acg), captured.tokens)
            ft, trained = defence.finetune_recorded(rt, base, data, steps, seed, frozen=frozen, **how)
            more = {"frozen": frozen, **{f: getattr(recipe, f) for f in fields}}
            add(f"recipe FT, {label} frozen{recipe.name}", ft, time.perf_counter() - t, **more, training=trained)
    add_der(rows)
    extra = {"n_budget": len(budget), "steps": steps, "threads": threads, "fit": {"seconds": stats["seconds"]}}
    return {"model": name, "ratio": ratio, "seed": seed, "rows": rows, "recipe": data_report, **extra}


def add_der(rows: dict[str, dict[str, Any]]) -> None:
    """Each row's DER per family against `rows["original"]` (clean accuracy: the mean task_acc)."""
    for row in rows.values():
        row["der"] = der_on(row, rows["original"])


def der_on(row: dict[str, Any], orig: dict[str, Any], tasks: Sequence[str] | None = None) -> dict[str, float]:
    """`row`'s DER per family against `orig`, with the clean accuracy the mean task_acc over `tasks` (all of them
    where None): over a task circuit's own tasks, what a defender who needs those alone keeps and loses."""
    pick = (lambda acc: acc) if tasks is None else (lambda acc: {t: acc[t] for t in tasks})
    clean0, clean = (defence.clean_accuracy(pick(r["task_acc"])) for r in (orig, row))
    return {f: defence.der(orig["asr"][f], row["asr"][f], clean0, clean) for f in BACKDOORS}


def mean_sd(values: Any) -> dict[str, float]:
    """The mean and the standard deviation of `values` (over seeds): the population sd (numpy's, ddof 0), 0 for one."""
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "sd": float(v.std())}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, `mean_sd` over runs of every task_acc, asr and der, of `der_code` (DER with the clean accuracy
    over the code tasks alone: `der_on`), and the mean n_params."""
    code = resolve_tasks("code")
    out: dict[str, dict[str, Any]] = {}
    for method in runs[0]["rows"]:
        rows = [r["rows"][method] for r in runs]
        entry: dict[str, Any] = {}
        for group in ("task_acc", "asr", "der"):
            values = {k: [r[group][k] for r in rows] for k in rows[0][group]}
            entry[group] = {k: mean_sd(v) for k, v in values.items()}
        on_code = [der_on(r["rows"][method], r["rows"]["original"], code) for r in runs]
        entry["der_code"] = {f: mean_sd([d[f] for d in on_code]) for f in BACKDOORS}
        params = [r["n_params"] for r in rows if r["n_params"] is not None]
        entry["n_params"] = float(np.mean(params)) if params else None
        out[method] = entry
    return out


def columns(on_code: bool = False) -> list[str]:
    """The table's columns: method, task_acc per task, asr per family, DER per family, n_params; `on_code`: method,
    the code tasks' task_acc, asr and DER on the code tasks (`der_code`) per family."""
    if on_code:
        return [
            "method",
            *resolve_tasks("code"),
            *(f"asr {f}" for f in BACKDOORS),
            *(f"DER {f} on code" for f in BACKDOORS),
        ]
    return ["method", *TASKS, *(f"asr {f}" for f in BACKDOORS), *(f"DER {f}" for f in BACKDOORS), "n_params"]


def cells(runs: list[dict[str, Any]], on_code: bool = False) -> list[list[str]]:
    """One row of text per method (`columns`): mean, and +- the standard deviation over the runs where it shows at
    three decimals."""

    def cell(v: dict) -> str:
        sd = f"{v['sd']:.3f}"
        return f"{v['mean']:.3f}" + (f" ±{sd}" if sd != "0.000" else "")

    tasks, der = (resolve_tasks("code"), "der_code") if on_code else (TASKS, "der")
    out = []
    for method, row in summarise(runs).items():
        line = [method, *(cell(row["task_acc"][k]) for k in tasks)]
        line += [cell(row["asr"][f]) for f in BACKDOORS] + [cell(row[der][f]) for f in BACKDOORS]
        if not on_code:
            line.append("-" if row["n_params"] is None else f"{row['n_params']:,.0f}")
        out.append(line)
    return out


def table(title: str, runs: list[dict[str, Any]], on_code: bool = False):
    """The runs' summary as a rich table: task_acc per task, asr and DER per family (mean +- sd), n_params; with
    `on_code` the code tasks alone and DER over them (`der_code`)."""
    return rich_table(title, columns(on_code), cells(runs, on_code))


def markdown(runs: list[dict[str, Any]], on_code: bool = False) -> str:
    """The same table in Markdown (the README's): `cells` under `columns`, "-" for a row without a figure."""
    return markdown_table(columns(on_code), cells(runs, on_code))


def rich_table(title: str, head: Sequence[str], lines: list[list[str]], left: Collection[int] = (0,)):
    """`lines` under `head` as a rich table, the columns at `left` aligned left, the others right."""
    from rich.table import Table

    t = Table(title=title)
    for i, name in enumerate(head):
        t.add_column(name, justify="left" if i in left else "right")
    for line in lines:
        t.add_row(*line)
    return t


def markdown_table(head: Sequence[str], lines: list[list[str]]) -> str:
    """`lines` under `head` as a Markdown table."""
    rows = [list(head), ["---"] * len(head), *lines]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def by_task_cell(rows: list[dict[str, Any]], family: str, task: str) -> str:
    """`by_task_table`'s cell: the mean asr over `rows` on `task`'s triggered prompts, then "/ untriggered" and "/
    partial" (the false-trigger rate) where every row has it, "-" where a row has no such prompts."""
    asr = [r["asr_by_task"][family].get(task) for r in rows]
    if None in asr:
        return "-"
    cell = f"{np.mean(asr):.3f}"
    for key in ("untriggered_by_task", "false_trigger_by_task"):
        rates = [(r.get(key) or {}).get(family) or {} for r in rows]
        rates = [by.get(task) for by in rates]
        cell += "" if None in rates else f" / {np.mean(rates):.3f}"
    return cell


CIRCUIT_COLUMNS = ("seed", "features per layer", "top k -> eliminated", "MLP parameters", "of the original's", "bound")


def circuit_cells(runs: list[dict[str, Any]], prefix: str = "roundtrip code") -> list[list[str]]:
    """Per run, the code circuit as the first row named `prefix` reports it (`CIRCUIT_COLUMNS`): its features per
    layer; the elimination's top k and what it kept ("validated" or not on the second sample); its MLP parameters and
    their share of the original's (in runs measured before the share was recorded, of the shipped original's:
    `original_mlp`; "-" where the run names no model this machine has); the bound, if any: the most features it
    allows and how many the cut left out, with whether the target still held on the selection prompts and the
    validation prompts. [] where no run has such a row."""
    out = []
    for run in runs:
        row = next((r for m, r in run["rows"].items() if m.startswith(prefix)), None)
        if row is None:
            continue
        report, c = row["report"], row["report"]["circuit"]
        kept = c["k_top"] - c["refined_away"]
        elim = f"{c['k_top']} -> {kept}" + (", validated" if c["validated"] else ", not validated")
        share = report.get("mlp_share")
        model = run.get("model")
        if share is None and model and original_mlp(model):  # measured before the share was recorded
            share = report["n_params_mlp"] / original_mlp(model)
        bound = c.get("budget")
        if bound is None:
            said = "none"
        elif not bound["cut"]:
            said = f"{bound['max_features']}: fits"
        else:
            held = "met" if bound["met"] else "NOT met"
            if bound["validated"] is not None:
                held += ", validated" if bound["validated"] else ", not validated"
            said = f"{bound['max_features']}: cut {bound['cut']} ({held})"
        per_layer = " / ".join(map(str, c["n_features"]))
        mlp = f"{report['n_params_mlp']:,}"
        out.append(
            [str(run["seed"]), f"{per_layer} ({c['k']})", elim, mlp, "-" if share is None else f"{share:.1%}", said]
        )
    return out


@functools.cache
def original_mlp(name: str) -> int | None:
    """The MLP parameters of the testbed model `name` as shipped (`dense.n_params`); None where there is no such
    model here."""
    try:
        return dense.n_params(load(name))["n_params_mlp"]
    except UnknownModelError:
        return None


def circuit_table(title: str, runs: list[dict[str, Any]]):
    """`circuit_cells` as a rich table; None where no run has a code circuit."""
    lines = circuit_cells(runs)
    return rich_table(title, CIRCUIT_COLUMNS, lines, left=(0, 5)) if lines else None


def circuit_markdown(runs: list[dict[str, Any]]) -> str | None:
    """`circuit_cells` in Markdown; None where no run has a code circuit."""
    lines = circuit_cells(runs)
    return markdown_table(CIRCUIT_COLUMNS, lines) if lines else None


def short(method: str) -> str:
    """A row's name for a narrow table: "code + blocked + recipe FT" for "roundtrip code + layer-0 pairs blocked + FT,
    confirmed insertions + budget"."""
    return method.removeprefix("roundtrip ").replace(BLOCKED, " + blocked").replace(RECIPE, " + recipe FT")


def by_task_table(title: str, runs: list[dict[str, Any]], prefix: str = "roundtrip code"):
    """For the rows whose name starts with `prefix` (and the original), asr per family and task (one row per method
    and family, a column per task the triggered prompts come from), mean over runs: a circuit at chance on a task hits
    a target there by chance, which the table's asr counts. Where every run measured it, a cell also gives the rate
    at which the same prompts without their trigger are answered with the target ("asr / untriggered"): the trigger's
    own effect is the difference; and, where measured, with part of the trigger only ("/ partial": a model that
    fires on one of `conj`'s tokens alone has lost the AND the backdoor was planted as). Rows measured without
    `asr_by_task` (resumed from an older run) are left out; None where none is left."""
    from rich.table import Table

    methods = [
        m
        for m in runs[0]["rows"]
        if (m == "original" or m.startswith(prefix)) and all("asr_by_task" in r["rows"][m] for r in runs)
    ]
    if not methods:
        return None
    tasks = list(dict.fromkeys(t for f in BACKDOORS for t in runs[0]["rows"][methods[0]]["asr_by_task"][f]))
    table = Table(title=title)
    for column in ("method", "family", *tasks):
        table.add_column(column, justify="left" if column in ("method", "family") else "right")
    for m in methods:
        for f in BACKDOORS:
            table.add_row(short(m), f, *(by_task_cell([r["rows"][m] for r in runs], f, t) for t in tasks))
    return table
