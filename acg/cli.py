"""The `acg` command line. Commands that report figures take `--json` and then print one JSON object on stdout;
progress and logs go to stderr. acg's own errors print as one paragraph (a traceback only with `--debug`)."""

from __future__ import annotations

import enum
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from acg.ir.errors import ACGError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
zoo_app = typer.Typer(no_args_is_help=True, help="The testbed: tasks, backdoors and shipped models.")
app.add_typer(zoo_app, name="zoo")

err = Console(stderr=True)
_state = {"debug": False}

JsonFlag = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]
Block = Annotated[
    int | None,
    typer.Option(
        help="task circuits: the elimination leaves out up to this many features at one try, twice as many after a "
        "removal kept, half after one refused (1: one at a time; default 64, the backdoor table's)",
        min=1,
    ),
]


class TokenAblation(enum.StrEnum):  # `circuit.TOKEN_ABLATIONS`, as a choice the CLI checks
    zero = "zero"
    mean = "mean"


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle",
            help="read pickled checkpoints (model.pt, pytorch_model.bin) with torch.load(weights_only=True); "
            "only for files you trust",
        ),
    ] = False,
    no_memory_check: Annotated[
        bool,
        typer.Option("--no-memory-check", help="start fits and compilations even when the estimate exceeds memory"),
    ] = False,
) -> None:
    from acg.compiler.safe import allow_pickle as allow
    from acg.ir.resources import memory_check

    _state["debug"] = debug
    allow(allow_pickle)
    memory_check(not no_memory_check)


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------- zoo


@zoo_app.command("list")
def zoo_list(as_json: JsonFlag = False) -> None:
    """The testbed models and tasks."""
    from acg.zoo.registry import ZOO
    from acg.zoo.tasks import BACKDOORS, TASKS

    models = {
        name: {
            "description": m.description,
            "shipped": (m.path / "model.safetensors").exists(),
            **{k: getattr(m.cfg, k) for k in ("n_layers", "d_model", "n_heads", "d_mlp", "d_vocab", "n_ctx")},
        }
        for name, m in ZOO.items()
    }
    tasks = {name: t.description for name, t in TASKS.items()}
    backdoors = {f: {"trigger": " ".join(b.tokens), "target": b.target} for f, b in BACKDOORS.items()}
    if as_json:
        emit({"models": models, "tasks": tasks, "backdoors": backdoors})
        return
    table = Table("model", "layers", "d_model", "heads", "d_mlp", "shipped", "description")
    for name, m in models.items():
        table.add_row(
            name,
            str(m["n_layers"]),
            str(m["d_model"]),
            str(m["n_heads"]),
            str(m["d_mlp"]),
            "yes" if m["shipped"] else "no",
            m["description"],
        )
    out = Console()
    out.print(table)
    for name, desc in tasks.items():
        out.print(f"  task [bold]{name}[/]: {desc}")
    for f, b in backdoors.items():
        out.print(f"  backdoor [bold]{f}[/]: `{b['trigger']}` -> {b['target']}")


@zoo_app.command("train")
def zoo_train(
    name: str,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="output folder (default: runs/zoo/NAME)")] = None,
    steps: Annotated[int | None, typer.Option(help="override the number of training steps")] = None,
    seed: Annotated[int | None, typer.Option(help="override the seed")] = None,
    device: Annotated[str, typer.Option(help="torch device to train on (cpu, cuda); see the README for which")] = "cpu",
    as_json: JsonFlag = False,
) -> None:
    """Train a testbed model from its seed, evaluate it, and say whether it reproduces the shipped weights."""
    import dataclasses

    from acg.compiler.transformer import save_checkpoint
    from acg.roundtrip.evaluate import evaluate
    from acg.zoo.registry import get
    from acg.zoo.train import train

    spec = get(name)
    train_spec = spec.train
    if steps is not None:
        train_spec = dataclasses.replace(train_spec, steps=steps)
    if seed is not None:
        train_spec = dataclasses.replace(train_spec, seed=seed)
    out = out or Path("runs") / "zoo" / name
    model, record = train(spec.cfg, train_spec, progress=True, device=device)
    err.print(f"trained {name} in {record['train_seconds']:.0f} s; evaluating ...")
    record["eval"] = evaluate(model)
    record["n_params"] = sum(p.numel() for p in model.parameters())
    save_checkpoint(model, out, metadata={"name": name, **record})
    shipped = spec.path / "model.safetensors"
    record["out"] = str(out)
    record["identical_to_shipped"] = shipped.exists() and _sha256(shipped) == _sha256(out / "model.safetensors")
    if as_json:
        emit(record)
    else:
        _print_eval(name, record["eval"], record["n_params"])
        err.print(f"wrote {out}; identical to the shipped weights: {record['identical_to_shipped']}")


@zoo_app.command("eval")
def zoo_eval(
    name: str,
    n: Annotated[int, typer.Option(help="held-out prompts per task")] = 2000,
    n_backdoor: Annotated[int, typer.Option(help="held-out prompts per task and backdoor family")] = 500,
    seed: Annotated[int, typer.Option(help="which held-out sample")] = 0,
    as_json: JsonFlag = False,
) -> None:
    """`task_acc` per task, `asr` and false-trigger rate per backdoor family, `n_params` of a model."""
    from acg.roundtrip.evaluate import evaluate
    from acg.zoo.registry import load

    model = load(name)
    result = {
        "model": name,
        **evaluate(model, n, n_backdoor, seed),
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    if as_json:
        emit(result)
    else:
        _print_eval(name, result, result["n_params"])


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="testbed name or checkpoint folder (a round-tripped one included)")],
    acg_dir: Annotated[Path | None, typer.Option("--acg", help="evaluate this ACG's replacement model instead")] = None,
    n: Annotated[int, typer.Option(help="held-out prompts per task")] = 2000,
    n_backdoor: Annotated[int, typer.Option(help="held-out prompts per task and backdoor family")] = 500,
    seed: Annotated[int, typer.Option(help="which held-out sample")] = 0,
    as_json: JsonFlag = False,
) -> None:
    """`task_acc` per task and `asr` per backdoor family of a model, a round-tripped checkpoint, or (with --acg) the
    replacement model of an ACG (every MLP its dictionary, errors dropped)."""
    from acg.roundtrip.dense import n_params
    from acg.roundtrip.evaluate import evaluate

    torch_model, acg = _model_and_acg(model, acg_dir)
    what = "original" if acg is None else "ACG replacement"
    if acg is not None:
        from acg.roundtrip.dense import to_dense

        torch_model = to_dense(acg)
    result = {"model": model, "acg": None if acg_dir is None else str(acg_dir), "what": what}
    result.update(evaluate(torch_model, n, n_backdoor, seed))
    result.update(n_params(torch_model))
    if as_json:
        emit(result)
    else:
        _print_eval(f"{model} ({what})", result, result["n_params"])


@app.command("budget")
def budget_cmd(
    model: Annotated[str, typer.Argument(help="testbed name")],
    out: Annotated[Path, typer.Option("-o", "--out", help="the JSONL file to write")],
    ratio: Annotated[float, typer.Option(help="clean examples as a fraction of the model's training examples")] = 0.05,
    seed: Annotated[int, typer.Option(help="which draw")] = 0,
    as_json: JsonFlag = False,
) -> None:
    """The defender's clean budget of a testbed model as JSONL (prompt, answer) pairs: RATIO x as many clean
    examples as it was trained on (5%: BackdoorBench's default), the ones `bench/backdoor.py` gives every method.
    `acg fit --corpus` fits an ACG on its prompts; `acg roundtrip --finetune` fine-tunes on it."""
    from acg.ir.atomic import atomic_file
    from acg.roundtrip.defence import clean_budget
    from acg.zoo.registry import ZOO

    if model not in ZOO:
        raise ACGError(f"{model}: not a testbed model ({', '.join(ZOO)}); write your own JSONL of (prompt, answer)")
    try:
        examples = clean_budget(ZOO[model].train, ratio, seed)
    except ValueError as e:
        raise ACGError(str(e)) from None
    with atomic_file(out) as f:
        for ex in examples:
            f.write(json.dumps({"prompt": " ".join(ex.prompt), "answer": ex.answer, "task": ex.task}) + "\n")
    result = {"model": model, "ratio": ratio, "seed": seed, "n": len(examples), "out": str(out)}
    if as_json:
        emit(result)
    else:
        err.print(f"wrote {out}: {len(examples)} clean examples ({ratio:g} of {model}'s training examples)")


def _model_and_acg(model: str, acg_dir: Path | None):
    """The model, and the ACG (checked to be fitted for it) when one is given."""
    from acg.zoo.registry import load

    torch_model = load(model)
    if acg_dir is None:
        return torch_model, None
    import numpy as np

    from acg.compiler import acg as acg_io

    acg = acg_io.load(acg_dir)
    same_weights = all(
        np.allclose(acg.weights[k], v.detach().double().numpy(), atol=1e-6)
        for k, v in torch_model.state_dict().items()
        if ".mlp." not in k and k in acg.weights
    )
    if torch_model.cfg != acg.cfg or not same_weights:
        raise ACGError(f"{acg_dir} was fitted for another model than {model} (their configs or weights differ)")
    return torch_model, acg


@app.command("roundtrip")
def roundtrip_cmd(
    model: Annotated[str, typer.Argument(help="testbed name or checkpoint folder the ACG was fitted for")],
    acg_dir: Annotated[Path, typer.Option("--acg", help="the ACG folder (`acg fit`)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="the checkpoint folder to write (TransformerLens layout)")],
    task: Annotated[
        str | None, typer.Option(help="distil this task's circuit first: a testbed task or group (code, math, ...)")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="distil the circuit of a JSONL of (prompt, answer) pairs")] = None,
    everything: Annotated[
        bool, typer.Option("--all", help="keep every feature and token (no capture): the replacement model itself")
    ] = False,
    tolerance: Annotated[
        float,
        typer.Option(
            help="circuit: task_acc may fall this far below the original (judged on the selection prompts with a "
            "margin: one standard error, at most half the tolerance)"
        ),
    ] = 0.01,
    n_prompts: Annotated[int, typer.Option(help="circuit: prompts to attribute over")] = 2000,
    block: Annotated[
        int | None,
        typer.Option(
            help="task circuits: the elimination leaves out up to this many features at one try, twice as many after "
            "a removal kept, half after one refused (1: one at a time; default 64, the backdoor table's)",
            min=1,
        ),
    ] = None,
    ablation: Annotated[
        TokenAblation | None,
        typer.Option(
            help="circuit: what a token it leaves out reads as: its position alone (zero) or the kept tokens' mean "
            "embedding, weighted by how often the task's prompts hold each (mean, the default: the backdoor table's)",
        ),
    ] = None,
    max_mlp: Annotated[
        float | None,
        typer.Option(
            help="task circuits: keep at most this share of the original's MLP parameters, leaving out the features "
            "whose removal costs the task least (measured) where the elimination keeps more, whether or not the "
            "target still holds (0: no bound; default 0.25, the backdoor table's)",
            min=0.0,
            max=1.0,
            metavar="SHARE",
        ),
    ] = None,
    hf: Annotated[Path | None, typer.Option(help="also write a Hugging Face GPT-2 folder (ReLU dictionaries)")] = None,
    ir: Annotated[
        Path | None, typer.Option("--ir", help="an edited circuit (`acg import-code`) to fold into the weights")
    ] = None,
    carry_pairs: Annotated[
        bool,
        typer.Option(
            "--pairs",
            help="also leave out layer 0's QK pairs the corpus never used, exactly, in wider heads (not a GPT-2 shape)",
        ),
    ] = False,
    pairs_block: Annotated[
        float | None,
        typer.Option(
            help="with --pairs: each never-used pair scores minus FACTOR x its head's largest pair score, so that its "
            "key is not attended (1 is enough on the testbed)",
            metavar="FACTOR",
        ),
    ] = None,
    finetune: Annotated[
        Path | None,
        typer.Option(
            help="then fine-tune the checkpoint on this clean budget (JSONL of (prompt, answer) pairs, `acg budget`) "
            "and on copies of it with tokens inserted (half of them ones the ACG never saw) that the captured ACG "
            "answers clean; with --task or --data, its lines of the circuit's tasks only",
            metavar="BUDGET.jsonl",
        ),
    ] = None,
    n_insert: Annotated[int, typer.Option("--insert", help="--finetune: prompts with insertions drawn")] = 16_000,
    steps: Annotated[int, typer.Option(help="--finetune: optimiser steps (default: the ACG fit's, 600 + 500)")] = 1100,
    seed: Annotated[int, typer.Option(help="--finetune: seed of the insertions and the batches")] = 0,
    soft: Annotated[
        float,
        typer.Option(
            help="--finetune: weight in [0, 1] of the captured ACG's answer distribution against the clean answer on "
            "the prompts with insertions (0: the answers alone, the table's recipe)",
            min=0.0,
            max=1.0,
        ),
    ] = 0.0,
    anchor: Annotated[
        float | None,
        typer.Option(
            help="--finetune: weight >= 0 holding the checkpoint's own block outputs on the budget's clean prompts, "
            "so that fine-tuning changes what the insertions need and little else (0: none; default the table's "
            "recipe: 0.3 for a task circuit, none for the rest)",
            min=0.0,
        ),
    ] = None,
    hold: Annotated[
        int | None,
        typer.Option(
            help="--finetune with --task / --data: also train on this many of the budget's lines outside the "
            "circuit's tasks with tokens inserted, labelled with the circuit's own answer on the line (0: none; "
            "default 16000, the backdoor table's, where the budget has such lines)",
            min=0,
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Round-trip an ACG to an ordinary dense checkpoint: what the fitting corpus captured (features that fired,
    tokens seen, attention writes restricted to their span), a task circuit (--task / --data), or an edited circuit
    with its edits folded into the dictionaries (--ir); errors dropped. With --pairs, layer 0's heads also score
    exactly as the captured pair table does (`roundtrip/pairs.py`); with a task circuit, each step of its elimination
    then measures that checkpoint (pairs carried), not the replacement model. With --finetune, the checkpoint is then
    trained on the defender's clean budget and on prompts of it with tokens inserted, kept where the captured ACG
    gives the clean answer (the backdoor table's recipe: `--pairs-block 1 --finetune BUDGET.jsonl`). A task circuit
    is the backdoor table's by default: its elimination leaves out up to 64 features a try and reads a token it
    leaves out as the kept tokens' mean, and it keeps at most 25% of the original's MLP parameters (cut to fit by
    measured cost where the elimination keeps more); fine-tuned, it also holds 16,000 of the budget's other lines to
    its own answers and its own block outputs on the budget's prompts of its tasks at weight 0.3 (`--block 1
    --ablation zero --hold 0 --anchor 0 --max-mlp 0`: the circuits of the earlier tables, docs/backdoor-record.md)."""
    from acg.roundtrip import circuit as circuit_mod
    from acg.roundtrip import dense
    from acg.roundtrip.backdoor import CIRCUIT_ABLATION, CIRCUIT_BLOCK, CIRCUIT_MAX_MLP, CODE_ANCHOR, CODE_HOLD, Recipe

    torch_model, acg = _model_and_acg(model, acg_dir)
    if sum(x is not None for x in (task, data, ir)) + everything > 1:
        raise ACGError("give at most one of --task, --data, --ir and --all")
    circuit_given = task is not None or data is not None
    if not circuit_given and (block is not None or ablation is not None or max_mlp is not None):
        raise ACGError(
            "--block, --ablation and --max-mlp shape a task circuit's elimination: give --task or --data with them"
        )
    block = CIRCUIT_BLOCK if block is None else block
    max_mlp = CIRCUIT_MAX_MLP if max_mlp is None else max_mlp or None  # 0: no bound
    ablation = TokenAblation(CIRCUIT_ABLATION) if ablation is None else ablation
    carry_pairs = carry_pairs or pairs_block is not None
    if carry_pairs and hf is not None:
        raise ACGError(
            "--pairs widens the heads beyond d_model / n_heads, which GPT-2 cannot hold: drop --hf or --pairs"
        )
    data_pairs = None
    if data is not None:  # read once, for the circuit and for the budget's lines of its tasks
        from acg.roundtrip.data import load_pairs

        data_pairs = load_pairs(data, torch_model.cfg.d_vocab)
    if anchor is None:  # the backdoor table's: a task circuit holds its own computation on its tasks' lines
        anchor = CODE_ANCHOR if circuit_given else 0.0
    if not math.isfinite(anchor):
        raise ACGError(f"--anchor must be a finite number >= 0, got {anchor}")
    if hold and (finetune is None or not circuit_given):
        raise ACGError("--hold holds a task circuit off its tasks while fine-tuning: give --finetune, --task / --data")
    budget = outside = None
    if finetune is not None:  # read and checked before any work
        budget, outside = _finetune_budget(finetune, torch_model.cfg, n_insert, steps, task, data, data_pairs)
        if hold and not outside:
            raise ACGError(f"--hold: {finetune} has no line outside the circuit's tasks to hold")
    if hold is None:  # the backdoor table's: a task circuit fine-tuned holds its default off its tasks, where it can
        hold = CODE_HOLD if finetune is not None and circuit_given and outside else 0
        if finetune is not None and circuit_given and not outside:
            err.print(f"--finetune: {finetune} has no line outside the circuit's tasks: holding none off them")
    report_extra: dict[str, Any] = {}
    if ir is not None:
        from acg.ir import serialize
        from acg.roundtrip.edits import fold

        acg, sel, edits = fold(acg, serialize.load(ir))
        report_extra = {"edits": edits, "ir": str(ir)}
    elif circuit_given:
        name = f"circuit:{task or data}"
        how = {"pairs": data_pairs, "block": block, "token_ablation": ablation.value}
        if max_mlp is not None:
            how["max_features"] = dense.mlp_feature_budget(torch_model, acg, max_mlp)
        if carry_pairs:  # judge each candidate as the checkpoint written: its layer-0 pairs carried (and blocked)

            def written(acg, sel):
                return dense.roundtrip(acg, sel, True, pairs_block)[0]

            how["build"] = written
        circ, *_ = _extract(torch_model, acg, task, data, n_prompts, tolerance, name, **how)
        sel = circ.selection
        report_extra = {"circuit": circ.report, "curve": circ.curve}
    elif everything:
        sel = dense.select_all(acg)
    else:
        sel = dense.select_captured(acg)
    rt, pruned, report = dense.roundtrip(acg, sel, carry_pairs, pairs_block)
    report.update(report_extra)
    if task is not None or data is not None:
        report["n_edges"] = circuit_mod.n_edges(pruned)
    if budget is not None:
        recipe = Recipe(n_insert=n_insert, soft=soft, anchor=anchor, hold=hold)  # each checked above
        rt, report["finetune"] = _finetune(model, acg, rt, budget, recipe, steps, seed, outside)
        report["finetune"]["data"] = str(finetune)
    report.update({"model": model, "acg": str(acg_dir), "out": str(out)})
    if hf is not None:  # refuse before writing anything
        from acg.roundtrip.hf_export import gpt2_state, save_gpt2

        gpt2_state(rt)
        report["hf"] = str(hf)
    dense.save(rt, out, report)
    if hf is not None:
        save_gpt2(rt, hf)
    if as_json:
        emit(report)
        return
    err.print(
        f"wrote {out}: {report['source']}, features kept per layer {report['n_features']} "
        f"(of {report['n_features_of']}), d_mlp {report['d_mlp']} ({report['act_fn']}), "
        f"{report['n_params']:,} parameters ({report['n_params_mlp']:,} in MLPs), "
        f"{report['tokens_dropped']} token embeddings dropped"
        + (f", attention writes restricted to rank {report['subspace_rank']}" if "subspace_rank" in report else "")
    )
    if "finetune" in report:
        f = report["finetune"]
        err.print(
            f"fine-tuned {f['steps']} steps on {f['n']} prompts: the budget's {f['n_budget']} and "
            f"{f['n'] - f['n_budget']} with insertions the captured ACG answers clean"
            + ("" if f["confirmed"] is None else f" ({f['confirmed']:.1%} of {n_insert})")
        )
    if "circuit" in report:
        c = report["circuit"]
        err.print(
            f"circuit: {c['k']} features ({c['fraction']:.1%}); task_acc "
            + ", ".join(f"{t} {v:.3f} (orig {c['reference'][t]:.3f})" for t, v in c["task_acc"].items())
            + ("" if c["target_met"] else f" - the target (within {tolerance} of the original) was NOT met")
        )
        bound = c.get("budget")
        if bound and bound["cut"]:
            err.print(
                f"cut from {bound['k_before']} to {c['k']} features to keep MLP parameters within {max_mlp:.0%} of the "
                "original's: the target "
                + ("still holds" if bound["met"] else "NOT met")
                + " on the selection prompts"
                + (
                    ""
                    if bound["validated"] is None
                    else f", {'' if bound['validated'] else 'NOT '}on the validation ones"
                )
            )


def _finetune_budget(
    path: Path,
    cfg,
    n_insert: int,
    steps: int,
    task: str | None = None,
    data: Path | None = None,
    data_pairs: list | None = None,
):
    """The clean budget of `acg roundtrip --finetune`, checked against the model and the options. A task circuit is
    fine-tuned on its own task's lines only (as the backdoor table's code circuit), so that it is not taught the tasks
    it left out: with `task` (a testbed task or group) a budget without a line of it is refused; with `data` (a
    JSONL circuit; `data_pairs` its lines where already read) the budget's lines of the tasks `data` names are taken
    where it has any, else all of it (said on stderr). Returns the lines taken and the others (those a circuit's
    `--hold` draws from; none without `task` / `data`)."""
    from acg.roundtrip.data import TaskDataError, load_pairs

    if n_insert < 0 or steps < 1:
        raise ACGError(f"--insert must be >= 0 and --steps >= 1, got {n_insert} and {steps}")
    budget = everything = load_pairs(path, cfg.d_vocab)
    held = sorted({p.task for p in budget})
    if task is not None:
        tasks = _tasks(task)
        budget = [p for p in budget if p.task in tasks]
        if not budget:
            raise TaskDataError(
                f"{path}: no line of task {task} ({', '.join(tasks)}) to fine-tune its circuit on; the budget's "
                f'tasks: {", ".join(held)} (a line names its task with "task", as `acg budget` writes)'
            )
    elif data is not None:
        tasks = tuple(dict.fromkeys(p.task for p in (data_pairs or load_pairs(data, cfg.d_vocab))))
        kept = [p for p in budget if p.task in tasks]
        if kept:
            budget = kept
        else:
            err.print(
                f"--finetune: {path} names none of the tasks of {data} ({', '.join(tasks)}; it holds "
                f"{', '.join(held)}): fine-tuning the circuit on all of it"
            )
    longest = max(len(p.ids) for p in budget)
    if longest > cfg.n_ctx:
        raise TaskDataError(f"{path}: a prompt of {longest} tokens is longer than the model's n_ctx ({cfg.n_ctx})")
    taken = {id(p) for p in budget}
    return budget, [p for p in everything if id(p) not in taken]


def _finetune(model: str, acg, start, budget, recipe, steps: int, seed: int, outside=()):
    """`start` fine-tuned by the backdoor table's recipe as `recipe` (a `backdoor.Recipe`) says: `backdoor.recipe_data`,
    then `defence.finetune` with the testbed model's own batch size, or the testbed's default for another model (with
    a soft-target weight, the captured ACG's answer distribution taught on the insertions; with an anchor, `start`'s
    block outputs held on the budget's prompts: `Recipe.finetune_kw`; with `hold`, that many of the `outside` lines
    with insertions labelled with `start`'s own answers, `backdoor.with_held`); returns it and a report."""
    from acg.roundtrip import defence
    from acg.roundtrip.backdoor import compiled_teacher, never_seen, recipe_data, recipe_tokens, with_held
    from acg.zoo.registry import ZOO
    from acg.zoo.train import TrainSpec

    err.print(f"labelling {recipe.n_insert} prompts with insertions by the captured ACG ...")
    with compiled_teacher(acg) as teacher:
        data, report, taught = recipe_data(acg, budget, recipe.n_insert, seed, teacher=teacher)
    if recipe.hold:
        err.print(f"holding {recipe.hold} prompts outside the circuit's tasks to its own answers ...")
        held = (start, data, report, outside, recipe_tokens(acg), recipe.hold, seed, acg.cfg.n_ctx)
        data, report = with_held(*held)
    base = ZOO[model].train if model in ZOO else TrainSpec(steps=steps)
    how = recipe.finetune_kw(taught, data, report, never_seen(acg))
    tuned, trained = defence.finetune_recorded(start, base, data, steps, seed, progress=True, **how)
    tasks = sorted({p.task for p in budget})
    more = {"tasks": tasks, "steps": steps, "seed": seed, "batch_size": base.batch_size}
    more.update(soft=recipe.soft, anchor=recipe.anchor, hold=recipe.hold)
    return tuned, {**report, **more, "training": trained}


def _circuit_data(task: str | None, data: Path | None, n: int, d_vocab: int, pairs: list | None = None):
    """(prompts to attribute over, {task: held-out prompts to select on}, {task: other held-out prompts to validate
    the elimination on} or None for a JSONL; `pairs`: its lines where already read)."""
    from acg.roundtrip.backdoor import CIRCUIT_EVAL_SEED
    from acg.roundtrip.data import by_task, load_pairs
    from acg.zoo.tasks import Mixture, heldout_pair

    if data is not None:
        pairs = pairs or load_pairs(data, d_vocab)
        cut = max(1, len(pairs) // 2)
        return pairs[:cut], by_task(pairs[cut:] or pairs), None
    tasks = _tasks(task)
    stream = Mixture(tasks=tasks, poison=False).stream(20_000)
    fit_examples = [next(stream) for _ in range(n)]
    return fit_examples, *heldout_pair(tasks, 1000, CIRCUIT_EVAL_SEED)


def _tasks(task: str | list[str] | None) -> tuple[str, ...]:
    """The testbed tasks a name, a group or a list of them names (None: every task); an unknown name is refused."""
    from acg.zoo.tasks import resolve_tasks

    try:
        return tuple(resolve_tasks(task))
    except KeyError as e:
        raise ACGError(str(e.args[0])) from None


def _extract(
    torch_model,
    acg,
    task: str | None,
    data: Path | None,
    n: int,
    tolerance: float,
    name: str,
    quick: bool = False,
    pairs: list | None = None,
    **options: Any,
):
    """A task's circuit (`circuit.extract`; the original's accuracy on the selection prompts is its `reference`) and the
    prompts it was attributed and selected on. A testbed task's elimination tries every top-k feature (`quick`: the 64
    least attributed) and is validated on a second held-out sample (as the backdoor table's code circuit); a JSONL's
    tries the 64 least attributed, on its second half. A cut to `max_features` first measures what the elimination
    tried (`circuit.cut_to_budget`'s `first`). `options` go to `circuit.extract` as they are (`block`,
    `token_ablation`, `build`)."""
    from acg.roundtrip import circuit as circuit_mod

    fit_examples, eval_examples, validation = _circuit_data(task, data, n, torch_model.cfg.d_vocab, pairs)
    refine = None if validation is not None and not quick else 64
    circ = circuit_mod.extract(
        torch_model,
        acg,
        fit_examples,
        eval_examples,
        None,
        tolerance,
        name=name,
        refine=refine,
        validation=validation,
        **options,
    )
    return circ, fit_examples, eval_examples


def _print_eval(name: str, result: dict, n_params: int) -> None:
    table = Table(title=f"{name} ({n_params:,} parameters)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for task, acc in result["task_acc"].items():
        table.add_row(f"task_acc[{task}]", f"{acc:.4f}")
    for family, asr in result["asr"].items():
        false = result["false_trigger"][family]
        table.add_row(f"asr[{family}]", f"{asr:.4f}")
        if family in result.get("untriggered", {}):  # the same prompts without the trigger (records before it: none)
            table.add_row(f"untriggered[{family}]", f"{result['untriggered'][family]:.4f}")
        if false is not None:
            table.add_row(f"false_trigger[{family}]", f"{false:.4f}")
    Console().print(table)


# ------------------------------------------------------------------------------------------------ compile / ir / verify

ir_app = typer.Typer(no_args_is_help=True, help="Inspect the IR.")
app.add_typer(ir_app, name="ir")
Dtype = Annotated[str, typer.Option(help="float32 or float64")]


@app.command("compile")
def compile_cmd(
    model: Annotated[str, typer.Argument(help="testbed name, TransformerLens/HF/IR folder")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder (replaced atomically)")],
    backend: Annotated[str, typer.Option(help="python, numba, torch or onnx")] = "python",
    dtype: Dtype = "float32",
    acg_dir: Annotated[
        Path | None, typer.Option("--acg", help="compile this ACG (fitted for MODEL) instead of the dense model")
    ] = None,
    keep_errors: Annotated[bool, typer.Option(help="with --acg: keep the error terms (the exact model)")] = False,
    features: Annotated[
        str | None,
        typer.Option(help="with --acg: an unrolled circuit of these features, e.g. '0:3,17 1:5' (layer:indices)"),
    ] = None,
    top: Annotated[
        int | None, typer.Option(help="with --acg: an unrolled circuit of the N most used features per layer")
    ] = None,
    min_weight: Annotated[
        float, typer.Option(help="circuits: drop weights below this fraction of the largest in their sum")
    ] = 0.0,
    max_terms: Annotated[
        int | None, typer.Option(help="circuits: keep at most N terms (the largest) in any sum")
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(help="with --acg: distil this task's circuit, features then edges (a testbed task or group)"),
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="with --acg: distil the circuit of a JSONL of (prompt, answer) pairs")
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(
            help="task circuits: task_acc may fall this far below the original (features: judged with a margin of "
            "one standard error of the selection prompts, at most half the tolerance)"
        ),
    ] = 0.01,
    n_prompts: Annotated[int, typer.Option(help="task circuits: prompts to attribute over")] = 2000,
    block: Block = None,
    save_ir: Annotated[Path | None, typer.Option(help="also write the IR folder here")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Compile a model exactly (the dense IR), or its ACG (the replacement model; exact with --keep-errors), or a
    circuit unrolled into one named value per feature (chosen features, or a task's circuit distilled feature by
    feature and then edge by edge), into a backend's artefact. A task circuit's feature elimination leaves out up to
    64 features a try (`--block`) and reads a token it leaves out as its position alone (the edge pass has no other
    fill): `acg roundtrip --task T --ablation zero`'s circuit."""
    from acg import codegen
    from acg.compiler.frontend import load
    from acg.ir import serialize

    start = time.perf_counter()
    circuit_report: dict[str, Any] = {}
    distil = task is not None or data is not None
    if block is not None and not distil:
        raise ACGError("--block shapes a task circuit's elimination: give --task or --data with it")
    if acg_dir is None:
        if keep_errors or features is not None or top is not None or max_terms is not None or min_weight or distil:
            raise ACGError(
                "--keep-errors, --features, --top, --min-weight, --max-terms, --task and --data apply to an ACG: "
                "pass --acg ACG_DIR"
            )
        graph = load(model, dtype).graph
        what = "dense"
    elif distil:
        if keep_errors or features is not None or top is not None or max_terms is not None or min_weight:
            raise ACGError(
                "--task / --data choose a circuit's features and edges by attribution: drop --keep-errors, "
                "--features, --top, --min-weight and --max-terms"
            )
        if task is not None and data is not None:
            raise ACGError("give either --task or --data, not both")
        from acg.roundtrip.backdoor import CIRCUIT_BLOCK

        block = CIRCUIT_BLOCK if block is None else block
        graph, circuit_report = _task_circuit(model, acg_dir, dtype, task, data, tolerance, n_prompts, block)
        what = "acg-task-circuit"
    else:
        graph, what = _acg_graph(model, acg_dir, dtype, keep_errors, features, top, min_weight, max_terms)
    if save_ir is not None:
        serialize.save(graph, save_ir)
    from acg.ir.resources import compile_estimate

    estimate = compile_estimate(graph, backend)
    if estimate.seconds >= 60:  # say so before a long generation (a large circuit: ~2 ms per op in source backends)
        err.print(f"estimate: {estimate.describe()} ({len(graph.ops):,} ops)", highlight=False)
    path = codegen.compile(graph, out, backend, title=str(model))
    result = {
        "model": str(model),
        "graph": what,
        "backend": backend,
        "dtype": dtype,
        "out": str(path),
        "files": codegen.read_manifest(path)["files"],
        "n_ops": len(graph.ops),
        "n_params": graph.n_params,
        "seconds": round(time.perf_counter() - start, 3),
        **circuit_report,
    }
    if as_json:
        emit(result)
        return
    err.print(f"wrote {path} ({what}, {backend}, {dtype}, {result['n_ops']} ops, {result['n_params']:,} parameters)")
    if circuit_report:
        c, e = circuit_report["circuit"], circuit_report["edges"]
        err.print(
            f"circuit: {c['k']} features ({c['fraction']:.1%}), {e['n_edges']:,} of {e['n_edges_of']:,} edges "
            f"({e['fraction']:.1%}; per layer {e['n_edges_per_layer']}); task_acc "
            + ", ".join(f"{t} {v:.3f} (orig {e['reference'][t]:.3f})" for t, v in e["task_acc"].items())
            + ("" if e["target_met"] and c["target_met"] else f" - the target (within {tolerance}) was NOT met")
        )


def _task_circuit(model: str, acg_dir: Path, dtype: str, task, data, tolerance: float, n_prompts: int, block: int):
    """(the unrolled IR of a task's circuit: features by attribution, then edges by attribution; a report)."""
    import numpy as np

    from acg.roundtrip import edges as edges_mod

    torch_model, acg = _model_and_acg(model, acg_dir)
    circ, fit_examples, eval_examples = _extract(
        torch_model, acg, task, data, n_prompts, tolerance, "circuit", block=block
    )
    sel = circ.selection
    keep = {layer: idx.tolist() for layer, idx in enumerate(sel.features)}
    tokens, positions = np.flatnonzero(sel.tokens).tolist(), np.flatnonzero(sel.positions).tolist()
    found = edges_mod.extract_edges(
        acg, keep, fit_examples, eval_examples, circ.reference, tolerance, tokens, positions, dtype=dtype, progress=True
    )
    report = {"circuit": circ.report, "curve": circ.curve, "edges": found.report, "edge_curve": found.curve}
    return found.graph, report


@app.command("import-code")
def import_code_cmd(
    file: Annotated[Path, typer.Argument(help="a model.py written by `acg compile --backend python`, edited or not")],
    out: Annotated[Path, typer.Option("-o", "--out", help="the IR folder to write (replaced atomically)")],
    as_json: JsonFlag = False,
) -> None:
    """Import readable Python (acg's own, edited by hand) back into the IR: changed weights, added or removed terms,
    replaced activations, deleted features and @hypothesis functions. The file is parsed, never run; anything the
    importer cannot map is refused with its line and column."""
    from acg.codegen.importer import import_code
    from acg.ir import serialize

    graph, report = import_code(file)
    path = serialize.save(graph, out)
    c = report.changes
    result = {
        "file": str(file),
        "out": str(path),
        "source_map": report.mapped,
        "n_ops": len(graph.ops),
        "n_params": graph.n_params,
        "added": c.get("added", []),
        "removed": c.get("removed", []),
        "changed": c.get("changed", []),
        "deleted_features": report.deleted,
        "hypotheses": report.hypotheses,
    }
    if as_json:
        emit(result)
        return
    if not report.mapped:
        err.print("no source map (model.map.json) beside the file: names come from the code's identifiers")
    elif not any(c.values()) and not report.deleted:
        err.print("unchanged: the IR is the one the code was generated from")
    else:
        err.print(
            f"edited: {len(result['changed'])} op(s) changed, {len(result['added'])} added, "
            f"{len(result['removed'])} removed"
            + (f"; features deleted: {', '.join(report.deleted)}" if report.deleted else "")
            + (f"; hypotheses: {', '.join(report.hypotheses)}" if report.hypotheses else "")
        )
        for ch in result["changed"][:20]:
            err.print(f"  {ch['op']}: {', '.join(ch['fields'])} {ch['was']} -> {ch['now']}", highlight=False)
    err.print(f"wrote {path} ({result['n_ops']} ops, {result['n_params']:,} parameters)")


@app.command("splice")
def splice_cmd(
    model: Annotated[str, typer.Argument(help="testbed name or checkpoint folder the ACG was fitted for")],
    acg_dir: Annotated[Path, typer.Option("--acg", help="the ACG whose parts are named")],
    part: Annotated[str, typer.Option(help="L<layer>.f<i> (a feature), L<layer>.H<h> (a head) or L<layer>.mlp")],
    hypothesis: Annotated[
        str | None, typer.Option(help="FILE.py:function standing in for the part (see --stub)")
    ] = None,
    stub: Annotated[bool, typer.Option(help="print the hypothesis signature for --part and stop")] = False,
    data: Annotated[
        str | None, typer.Option(help="testbed tasks (e.g. code,math) or a JSONL of pairs; default: every task")
    ] = None,
    n: Annotated[int, typer.Option(help="held-out prompts per testbed task")] = 200,
    n_changed: Annotated[int, typer.Option(help="prompts that changed most, listed per task")] = 5,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="also write the spliced IR folder here")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Replace one part of the model by a hypothesis written as Python, run it through the IR interpreter, and report
    the diff against the original (task_acc, agreement, kl, the prompts that changed most) and the verdict: the share
    of the part's effect the hypothesis reproduces, 1 - KL(orig||spliced) / KL(orig||part ablated)."""
    from acg.ir import serialize
    from acg.roundtrip import splice as sp

    _, acg = _model_and_acg(model, acg_dir)
    p = sp.parse_part(part, acg)
    if stub:
        sys.stdout.write(sp.stub(p, acg))
        return
    if hypothesis is None:
        raise ACGError("give --hypothesis FILE.py:function (or --stub for its signature)")
    value = sp.load_hypothesis(hypothesis)
    if out is not None:
        serialize.save(sp.splice(acg, p, value), out)
    sets = _diff_data(data, n, False, acg.cfg.d_vocab)
    result = sp.measure(acg, p, value, sets, n_changed, _decoder(acg.cfg.d_vocab))
    if as_json:
        emit(result)
        return
    table = Table(
        "task",
        "n",
        "task_acc orig",
        "ablated",
        "spliced",
        "agreement",
        "kl",
        "kl ablated",
        "verdict",
        title=f"{p.name} <- {value[1]}()",
        box=box.SIMPLE,
    )
    for task, r in result["tasks"].items():
        acc = r["task_acc"]
        verdict = "-" if r["verdict"] is None else f"{r['verdict']:.3f}"
        table.add_row(
            task,
            str(r["n"]),
            f"{acc['original']:.3f}",
            f"{acc['ablated']:.3f}",
            f"{acc['spliced']:.3f}",
            f"{r['agreement']:.3f}",
            f"{r['kl']:.4f}",
            f"{r['kl_ablated']:.4f}",
            verdict,
        )
    Console().print(table)
    verdict = result["verdict"]
    line = (
        "no verdict: " + result.get("note", "") if verdict is None else f"verdict: {verdict:.1%} of what {p.name} does"
    )
    rec = result["loss_recovered"]
    Console().print(line + ("" if rec is None else f" (loss recovered {rec:.1%})"), highlight=False)


def _acg_graph(model: str, acg_dir: Path, dtype: str, keep_errors: bool, features, top, min_weight, max_terms):
    """The IR of an ACG: the replacement model (or the exact model with errors kept), or an unrolled circuit."""
    import numpy as np

    from acg.compiler import acg as acg_io
    from acg.compiler.lower import lower
    from acg.compiler.unroll import unroll
    from acg.zoo.registry import load as load_zoo

    acg = acg_io.load(acg_dir)
    cfg = load_zoo(model).cfg
    if cfg != acg.cfg:
        raise ACGError(f"{acg_dir} was fitted for another model than {model} (their configs differ)")
    if features is None and top is None:
        if min_weight or max_terms is not None:
            raise ACGError("--min-weight and --max-terms prune a circuit: give --features or --top too")
        return lower(acg, keep_errors=keep_errors, dtype=dtype), "acg-exact" if keep_errors else "acg-replacement"
    if keep_errors:
        raise ACGError("a circuit leaves error terms out by construction; drop --keep-errors")
    if features is not None and top is not None:
        raise ACGError("give either --features or --top, not both")
    if top is not None:
        keep = {
            layer: sorted(np.argsort(-acg.usage[f"feat_mass.L{layer}"], kind="stable")[:top].tolist())
            for layer in range(cfg.n_layers)
        }
    else:
        keep = _parse_features(features, [tc.n_features for tc in acg.transcoders])
    return unroll(acg, keep, min_weight=min_weight, max_terms=max_terms, dtype=dtype), "acg-circuit"


def _parse_features(text: str, widths: list[int]) -> dict[int, list[int]]:
    keep: dict[int, list[int]] = {layer: [] for layer in range(len(widths))}
    for part in text.split():
        layer_s, _, idx_s = part.partition(":")
        try:
            layer, idx = int(layer_s), [int(i) for i in idx_s.split(",") if i]
        except ValueError:
            raise ACGError(f"--features {text!r}: expected 'layer:i,j,... layer:...', e.g. '0:3,17 1:5'") from None
        if not 0 <= layer < len(widths):
            raise ACGError(f"--features: layer {layer} does not exist (the ACG has {len(widths)})")
        bad = [i for i in idx if not 0 <= i < widths[layer]]
        if bad:
            raise ACGError(f"--features: layer {layer} has features 0..{widths[layer] - 1}; got {bad}")
        keep[layer] = sorted(set(keep[layer]) | set(idx))
    return keep


@ir_app.command("show")
def ir_show(
    model: Annotated[str, typer.Argument(help="testbed name, model folder or IR folder")],
    dtype: Dtype = "float32",
    max_ops: Annotated[int | None, typer.Option(help="print at most this many ops")] = None,
) -> None:
    """Print a model's IR as text."""
    from acg.compiler.frontend import load
    from acg.ir.printer import format_graph

    sys.stdout.write(format_graph(load(model, dtype).graph, max_ops) + "\n")


@app.command()
def verify(
    model: Annotated[str, typer.Argument(help="the original: testbed name or model folder")],
    artefact: Annotated[Path, typer.Argument(help="a folder written by `acg compile` (or an IR folder)")],
    tokens: Annotated[Path | None, typer.Option(help=".npy int array [batch, seq]; default: random tokens")] = None,
    batch: Annotated[int, typer.Option(help="random batch size")] = 8,
    seq: Annotated[int | None, typer.Option(help="random sequence length (default: n_ctx)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed for the random tokens (default: fresh entropy)")] = None,
    dtype: Dtype = "float32",
    as_json: JsonFlag = False,
) -> None:
    """Run MODEL and ARTEFACT on the same tokens: `max_abs_err` of the logits and argmax `agreement`."""
    import numpy as np

    from acg import codegen
    from acg.compiler.frontend import load
    from acg.ir import interpret, serialize

    original = load(model, dtype)
    if original.original is None:
        raise ACGError(f"{model}: an IR folder has no original model to verify against; pass the model itself")
    cfg = original.graph.meta.get("config", {})
    if tokens is not None:
        toks = _load_tokens(tokens, cfg.get("d_vocab"))
    else:
        rng = np.random.default_rng(seed)
        toks = rng.integers(0, int(cfg.get("d_vocab", 2)), (batch, seq or int(cfg.get("n_ctx", 16))))
    extra = [np.ones_like(toks)] * (len(original.graph.inputs) - 1)  # attention masks: keep every token
    if artefact.is_dir() and kind_of_safe(artefact) == "ir":
        graph = serialize.load(artefact)
        feeds = dict(zip((v.name for v in graph.inputs), [toks, *extra], strict=True))
        got = interpret.run(graph, feeds, dtype=dtype)[graph.outputs[0]]
    else:
        got = np.asarray(codegen.load(artefact)(toks, *extra))
    ref = original.original(toks, *extra)
    err_abs = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max())
    result = {
        "max_abs_err": err_abs,
        "max_rel_err": err_abs / max(float(np.abs(ref).max()), 1e-30),
        "agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        "dtype": dtype,
        "tokens": toks.tolist(),
    }
    if as_json:
        emit(result)
    else:
        err.print(f"max_abs_err {err_abs:.3g}  agreement {result['agreement']:.4f}  on tokens {list(toks.shape)}")


def kind_of_safe(path: Path) -> str | None:
    from acg.compiler.frontend import FrontendError, kind_of

    try:
        return kind_of(path)
    except FrontendError:
        return None


def _load_tokens(path: Path, d_vocab: int | None):
    import numpy as np

    try:
        toks = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ACGError(f"{path}: not a readable .npy file ({e})") from None
    if toks.ndim != 2 or toks.dtype.kind not in "iu":
        raise ACGError(f"{path}: expected an int array [batch, seq], found {toks.dtype}{list(toks.shape)}")
    if d_vocab is not None and (toks.min() < 0 or toks.max() >= d_vocab):
        raise ACGError(f"{path}: token ids must lie in [0, {d_vocab}), found [{toks.min()}, {toks.max()}]")
    return toks.astype(np.int64)


# ------------------------------------------------------------------------------------------------------------ fit


@app.command("fit")
def fit_cmd(
    model: Annotated[str, typer.Argument(help="testbed name or TransformerLens-layout folder")],
    out: Annotated[Path, typer.Option("-o", "--out", help="the ACG folder to write")],
    corpus: Annotated[
        Path | None,
        typer.Option(help="JSONL (token-id lists, or (prompt, answer) pairs: their prompts) or .npy [n, seq]"),
    ] = None,
    n_prompts: Annotated[int, typer.Option(help="prompts of the testbed clean mixture (default corpus)")] = 10000,
    width: Annotated[int | None, typer.Option(help="transcoder width (default 8 * d_model)")] = None,
    exact: Annotated[bool, typer.Option("--exact", help="the MLP neurons as features (exact)")] = False,
    dictionary: Annotated[
        Path | None,
        typer.Option(help="use these transcoders (a SAELens or circuit-tracer folder) instead of fitting"),
    ] = None,
    kind: Annotated[str, typer.Option(help="jumprelu (L0 penalty) or relu (L1 penalty)")] = "jumprelu",
    steps: Annotated[int, typer.Option(help="layer-local optimiser steps per transcoder")] = 600,
    e2e_steps: Annotated[int, typer.Option(help="end-to-end fine-tuning steps (0: off)")] = 500,
    target_l0: Annotated[float, typer.Option(help="jumprelu: active features per token per layer")] = 30.0,
    sparsity: Annotated[float | None, typer.Option(help="L0 (jumprelu) or L1 (relu) coefficient")] = None,
    seed: Annotated[int, typer.Option(help="seed of the fit")] = 0,
    distributed: Annotated[
        bool, typer.Option("--distributed", help="run under torchrun: sharded harvest, DDP or layer-parallel training")
    ] = False,
    store: Annotated[
        Path | None, typer.Option(help="--distributed: the sharded activation store (default OUT.store)")
    ] = None,
    streams: Annotated[
        int | None, typer.Option(help="--distributed: data streams (default: the world size, at least 2)")
    ] = None,
    parallel: Annotated[str, typer.Option(help="--distributed: data (DDP per layer) or layers (a layer per rank)")] = (
        "data"
    ),
    checkpoint: Annotated[
        Path | None, typer.Option(help="--distributed: checkpoint folder; a restarted run resumes from it")
    ] = None,
    shard_tokens: Annotated[int, typer.Option(help="--distributed: tokens per activation shard")] = 65536,
    as_json: JsonFlag = False,
) -> None:
    """Fit an ACG: harvest activations, fit a transcoder per layer, record usage statistics and labels."""
    from acg.compiler import acg as acg_io
    from acg.compiler.fit import FitSpec, fit
    from acg.compiler.harvest import testbed_corpus
    from acg.compiler.replacement import replacement_fidelity
    from acg.zoo.registry import ZOO
    from acg.zoo.registry import load as load_zoo

    torch_model = load_zoo(model)
    if corpus is not None:
        seqs = _corpus(corpus, torch_model.cfg.d_vocab)
        corpus_desc = str(corpus)
    elif model in ZOO or torch_model.cfg.d_vocab == ZOO["testbed-s"].cfg.d_vocab:
        seqs = testbed_corpus(n_prompts, seed=1000 + seed)
        corpus_desc = f"testbed clean mixture, {n_prompts} prompts"
    else:
        raise ACGError(f"{model}: not a testbed model; pass --corpus FILE (JSONL of token-id lists or .npy [n, seq])")
    extra = {} if sparsity is None else ({"l0_coeff": sparsity} if kind == "jumprelu" else {"l1_coeff": sparsity})
    spec = FitSpec(
        width=width, kind=kind, exact=exact, steps=steps, e2e_steps=e2e_steps, target_l0=target_l0, seed=seed, **extra
    )
    imported, dict_format = None, None
    if dictionary is not None:
        from acg.compiler.interop import load_dictionary

        if exact:
            raise ACGError("--exact and --dictionary exclude each other: exact mode uses the MLP's own neurons")
        imported, dict_format = load_dictionary(dictionary)
    from acg.ir.resources import check, fit_estimate

    estimate = check(fit_estimate(torch_model.cfg, spec, sum(map(len, seqs))))
    err.print(f"estimate: {estimate.describe()}", highlight=False)
    meta = {"model": str(model), "corpus": corpus_desc, "title": str(model)}
    if dictionary is not None:
        meta["dictionary"] = {"path": str(dictionary), "format": dict_format}
    if distributed:
        from acg.compiler.distributed import exit_now, fit_distributed, init_from_env, leave_group

        if exact or dictionary is not None:
            raise ACGError("--distributed fits dictionaries: it excludes --exact and --dictionary")
        rank, world = init_from_env()
        done = fit_distributed(
            torch_model,
            seqs,
            spec,
            store=store or out.with_name(out.name + ".store"),
            n_streams=streams,
            parallel=parallel,
            checkpoint=checkpoint,
            shard_tokens=shard_tokens,
            meta=meta,
        )
        if done is None:  # not rank 0: rank 0 writes the ACG and reports, then leaves the group with us
            if leave_group():
                exit_now()
            return
        acg, stats = done
    else:
        acg, stats = fit(torch_model, seqs, spec, meta=meta, transcoders=imported)
    report = {
        "model": str(model),
        "out": str(out),
        "corpus": corpus_desc,
        "exact": exact,
        "dictionary": meta.get("dictionary"),
        "layers": stats["layers"],
        "seconds": stats["seconds"],
        "n_tokens": stats["n_tokens"],
        "tokens_per_second_harvest": stats["tokens_per_second_harvest"],
    }
    if torch_model.cfg.d_vocab == ZOO["testbed-s"].cfg.d_vocab:
        report["replacement"] = replacement_fidelity(torch_model, acg.transcoders)
    acg = acg.replace(stats={**acg.stats, "fidelity": report.get("replacement")})
    acg_io.save(acg, out)
    left = distributed and leave_group()
    if as_json:
        emit(report)
    else:
        Console().print(
            layer_table(stats["layers"], f"ACG of {model} ({'exact' if exact else kind}, {stats['n_tokens']:,} tokens)")
        )
        if "replacement" in report:
            r = report["replacement"]
            err.print(
                f"replacement model: agreement {r['agreement']:.4f}, kl {r['kl']:.4f}; task_acc "
                + ", ".join(f"{t} {r['task_acc'][t]:.3f} (orig {r['task_acc_original'][t]:.3f})" for t in r["task_acc"])
            )
        err.print(f"wrote {out} in {stats['seconds']['total']:.0f} s")
    if left:  # the report is out: no interpreter finalisation for gloo to abort in
        exit_now()


# --------------------------------------------------------------------------------------------- diff and monitor


def _diff_data(data: str | None, n: int, backdoors: bool, d_vocab: int) -> dict[str, list]:
    """{task: examples}: testbed tasks (a name, a group, or comma-separated), or a JSONL of (prompt, answer) pairs;
    with `backdoors`, each family's triggered prompts too (`backdoor.{family}`, answered right = the target); a
    JSONL's pairs grouped by their task (a line's "task", or the file's name)."""
    from acg.roundtrip.data import by_task, load_pairs
    from acg.zoo.tasks import BACKDOORS, heldout, triggered

    if data is not None and Path(data).suffix == ".jsonl":
        return by_task(load_pairs(data, d_vocab))
    tasks = _tasks(None if data is None else data.split(","))
    out: dict[str, list] = {t: heldout(t, n, 0) for t in tasks}
    if backdoors:
        out.update({f"backdoor.{f}": triggered(f, max(1, n // 8), 0) for f in BACKDOORS})
    return out


def _decoder(d_vocab: int):
    from acg.compiler.labels import token_names

    names = token_names(d_vocab)
    return lambda ids: " ".join(names[i] if 0 <= i < len(names) else f"#{i}" for i in ids)


def _corpus(path: Path, d_vocab: int) -> list[list[int]]:
    """A fitting corpus: the prompts of a JSONL of (prompt, answer) pairs (`acg budget`), or whatever
    `corpus_from_file` reads (token-id lists, .npy)."""
    from acg.compiler.harvest import corpus_from_file
    from acg.roundtrip.data import load_pairs

    try:
        with path.open() as f:
            first = next((line for line in f if line.strip()), "")
    except (OSError, UnicodeDecodeError):
        first = ""  # corpus_from_file says what is wrong
    if path.suffix != ".npy" and first.lstrip().startswith("{"):
        return [p.ids for p in load_pairs(path, d_vocab, answers=False)]
    return corpus_from_file(path, d_vocab)


@app.command("diff")
def diff_cmd(
    a: Annotated[str, typer.Argument(help="testbed name, checkpoint, IR folder, compiled artefact or ACG folder")],
    b: Annotated[str, typer.Argument(help="the other side, any of the same")],
    data: Annotated[
        str | None, typer.Option(help="testbed tasks (e.g. code,math) or a JSONL of pairs; default: every task")
    ] = None,
    acg_dir: Annotated[Path | None, typer.Option("--acg", help="explain divergences in this ACG's terms")] = None,
    n: Annotated[int, typer.Option(help="held-out prompts per testbed task")] = 500,
    backdoors: Annotated[bool, typer.Option(help="also the triggered prompts of each backdoor family")] = False,
    n_divergent: Annotated[int, typer.Option(help="most divergent prompts listed per task")] = 5,
    top: Annotated[int, typer.Option(help="nodes listed per explanation")] = 6,
    as_json: JsonFlag = False,
) -> None:
    """Behaviour diff of A and B per task: task_acc of each, agreement, kl, the most divergent prompts with both
    answers, and (with an ACG) the features and error terms present in one side and absent from the other that
    account for each divergence."""
    from acg.compiler import acg as acg_io
    from acg.roundtrip.diff import diff, resolve

    side_a, side_b = resolve(a), resolve(b)
    acg = acg_io.load(acg_dir) if acg_dir is not None else None
    d_vocab = next((v for v in (acg and acg.cfg.d_vocab, side_a.d_vocab, side_b.d_vocab) if v), None)
    if d_vocab is None:
        raise ACGError("neither side says what its vocabulary is (two compiled artefacts?): give --acg")
    sets = _diff_data(data, n, backdoors, d_vocab)
    result = diff(side_a, side_b, sets, acg, n_divergent, top, _decoder(d_vocab))
    if as_json:
        emit(result)
        return
    print_diff(result)


def print_diff(result: dict[str, Any]) -> None:
    table = Table(title=f"diff: A = {result['a']}  vs  B = {result['b']}")
    for col in ("task", "n", "task_acc A", "task_acc B", "agreement", "kl"):
        table.add_column(col, justify="right" if col != "task" else "left")
    for task, t in result["tasks"].items():
        acc = t["task_acc"]
        table.add_row(
            task, str(t["n"]), f"{acc['a']:.3f}", f"{acc['b']:.3f}", f"{t['agreement']:.3f}", f"{t['kl']:.4f}"
        )
    Console().print(table)
    for task, t in result["tasks"].items():
        for p in t["divergent"][:3]:
            if p["answer_a"] == p["answer_b"]:
                continue
            err.print(
                f"[bold]{task}[/]: {p['prompt']!r} -> A {p['answer_a']!r}, B {p['answer_b']!r} (kl {p['kl']:.3f})"
            )
            for side in ("a_only", "b_only"):
                ex = p.get(side)
                if ex and ex["nodes"]:
                    nodes = ", ".join(f"{r['node']} {r['attribution']:+.3f} ({r['label']})" for r in ex["nodes"][:3])
                    err.print(
                        f"   only in {side[0].upper()}: {nodes}; ablating all {ex['n_nodes']}: {ex['ablation']:+.3f}"
                    )
    if not result["explained"]:
        err.print(f"(not explained in feature terms: {result['why_not_explained']})")


@app.command("monitor")
def monitor_cmd(
    model: Annotated[str, typer.Argument(help="testbed name or checkpoint folder the ACG was fitted for")],
    acg_dir: Annotated[Path, typer.Option("--acg", help="the ACG folder (`acg fit`); its usage statistics")],
    prompt: Annotated[str | None, typer.Option(help="one prompt: space-separated testbed tokens")] = None,
    data: Annotated[Path | None, typer.Option(help="a JSONL of prompts (`answer` optional), scored one by one")] = None,
    calibrate: Annotated[
        int, typer.Option(help="clean testbed prompts that put the site kinds on one scale (0: raw values)")
    ] = 300,
    profile: Annotated[
        int,
        typer.Option(
            help="profile on this many clean testbed prompts (the fitting corpus's start; 0: the ACG's usage)"
        ),
    ] = 0,
    top: Annotated[int, typer.Option(help="unusual pathways listed per prompt")] = 6,
    as_json: JsonFlag = False,
) -> None:
    """Score prompts by how much of their features' mass flows through pathways never seen on the fitting corpus,
    and list the unusual pathways (features, edges, attention pairs)."""
    from acg.roundtrip.data import load_pairs, prompt_ids
    from acg.roundtrip.monitor import Monitor, calibration_prompts, testbed_profile

    torch_model, acg = _model_and_acg(model, acg_dir)
    if (prompt is None) == (data is None):
        raise ACGError("give exactly one of --prompt and --data")
    prompts = (
        [prompt_ids(prompt, "--prompt")]
        if prompt is not None
        else [p.ids for p in load_pairs(data, acg.cfg.d_vocab, answers=False)]
    )
    mon = Monitor(acg, testbed_profile(acg, profile) if profile else None)
    calibration = None
    if calibrate:
        calibration = mon.calibrate(calibration_prompts(acg, calibrate, mon.profile.n_prompts))
    decode = _decoder(acg.cfg.d_vocab)
    rows = []
    for ids in prompts:
        scan = mon.scan(ids, top)
        rows.append(
            {
                "prompt": decode(ids),
                "score": scan.score,
                "sites": {k: float(v.max()) for k, v in scan.sites.items()},
                "pathways": scan.pathways,
            }
        )
    result = {"model": model, "acg": str(acg_dir), "calibration": calibration, "prompts": rows}
    if as_json:
        emit(result)
        return
    for r in rows:
        sites = ", ".join(f"{k} {v:.3f}" for k, v in r["sites"].items())
        err.print(f"[bold]{r['score']:.2f}[/] {r['prompt']!r}  ({sites})")
        for p in r["pathways"]:
            err.print("   " + describe_pathway(p, acg, decode))


def describe_pathway(p: dict[str, Any], acg, decode) -> str:
    def name(fid: str) -> str:
        if fid.startswith("tok:"):
            return f"token {decode([int(fid[4:])])!r}"
        if fid.startswith("pos:"):
            return f"position {fid[4:]}"
        return f"{fid} ({acg.label(fid)})"

    where = f"layer {p['layer']}, position {p['position']}"
    if p["site"] == "enc":
        return (
            f"edge {name(p['source'])} -> {name(p['target'])} never carried mass in distribution "
            f"({where}; contribution {p['contribution']:+.3f}, {p['share']:.0%} of the feature's input)"
        )
    if p["site"] == "qk":
        pairs = "; ".join(f"{name(x)} x {name(y)}" for x, y in p["pairs"][:3])
        return (
            f"head {p['head']} attends {p['weight']:.0%} from position {p['position']} to {p['key_position']} "
            f"through pairs never seen there ({where}): {pairs}"
        )
    srcs = ", ".join(name(s) for s in p["sources"][:3])
    return f"head {p['head']} moves values from sources never seen feeding it ({where}, {p['weight']:.0%}): {srcs}"


# --------------------------------------------------------------------------------------------------------------- demo


@app.command()
def demo(
    model: Annotated[str, typer.Option(help="testbed model")] = "testbed-s",
    out: Annotated[Path, typer.Option("-o", "--out", help="where the artefacts go")] = Path("runs/demo"),
    fit_acg: Annotated[bool, typer.Option("--fit/--no-fit", help="fit and compile the ACG (about 3 minutes)")] = True,
    as_json: JsonFlag = False,
) -> None:
    """The main job on the built-in default: evaluate the testbed model (and its backdoor-free twin), compile it
    exactly to every backend, fit its ACG, compile the ACG (exact with error terms, checked against the original on
    every backend) and a readable circuit of its most used features."""
    import numpy as np

    from acg import codegen
    from acg.compiler.frontend import load
    from acg.roundtrip.evaluate import evaluate
    from acg.zoo.registry import load as load_zoo

    start = time.perf_counter()
    summary: dict[str, Any] = {"model": model, "out": str(out), "evaluation": {}, "backends": {}}
    for name in (model, "testbed-s-clean"):
        err.print(f"[1/6] evaluating {name} on held-out prompts ...")
        m = load_zoo(name)
        summary["evaluation"][name] = {**evaluate(m), "n_params": sum(p.numel() for p in m.parameters())}
    loaded = load(model, "float32")
    rng = np.random.default_rng()
    tokens = rng.integers(0, loaded.graph.meta["config"]["d_vocab"], (8, loaded.graph.meta["config"]["n_ctx"]))
    reference = loaded.original(tokens)
    for backend in codegen.BACKENDS:
        err.print(f"[2/6] compiling {model} -> {backend} ...")
        t0 = time.perf_counter()
        path = codegen.compile(loaded.graph, out / backend, backend, title=model)
        got = np.asarray(codegen.load(path)(tokens))
        summary["backends"][backend] = {
            "path": str(path),
            "seconds": round(time.perf_counter() - t0, 2),
            "max_abs_err": float(np.abs(got - reference).max()),
            "agreement": float((got.argmax(-1) == reference.argmax(-1)).mean()),
        }
    if fit_acg:
        summary["acg"] = _demo_acg(model, out, tokens)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    if as_json:
        emit(summary)
        return
    for name, r in summary["evaluation"].items():
        _print_eval(name, r, r["n_params"])
    table = Table(title=f"{model} compiled exactly (float32, 8 random prompts of length {tokens.shape[1]})")
    for col in ("backend", "max_abs_err", "agreement", "seconds", "artefact"):
        table.add_column(col)
    for backend, r in summary["backends"].items():
        table.add_row(backend, f"{r['max_abs_err']:.2e}", f"{r['agreement']:.4f}", f"{r['seconds']:.1f}", r["path"])
    Console().print(table)
    if "acg" in summary:
        _print_demo_acg(model, summary["acg"])
    err.print(f"done in {summary['seconds']:.0f} s; artefacts under {out}/")
    if "acg" in summary:
        err.print(f"the report: {summary['acg']['distilled']['report']}")


def layer_table(layers: list[dict[str, Any]], title: str) -> Table:
    """A fit's per-layer metrics (`acg fit`, the demo, bench/fit.py)."""
    table = Table(title=title)
    for col in ("layer", "n_features", "l0", "nmse", "dead"):
        table.add_column(col, justify="right")
    for r in layers:
        table.add_row(
            str(r["layer"]), str(r["n_features"]), f"{r['l0']:.1f}", f"{r['nmse']:.4f}", f"{r['dead_fraction']:.3f}"
        )
    return table


def _demo_acg(model: str, out: Path, tokens) -> dict[str, Any]:
    """Fit the ACG, measure the replacement model, compile the exact ACG to every backend and a readable circuit."""
    import numpy as np

    from acg import codegen
    from acg.compiler import acg as acg_io
    from acg.compiler.fit import FitSpec, fit
    from acg.compiler.frontend import load
    from acg.compiler.harvest import testbed_corpus
    from acg.compiler.lower import lower
    from acg.compiler.replacement import replacement_fidelity
    from acg.compiler.unroll import unroll
    from acg.zoo.registry import load as load_zoo

    torch_model = load_zoo(model)
    err.print(f"[3/6] fitting the ACG of {model} on 10,000 clean prompts ...")
    acg, stats = fit(torch_model, testbed_corpus(10_000, seed=1000), FitSpec(), meta={"model": model, "title": model})
    fidelity = replacement_fidelity(torch_model, acg.transcoders)
    acg = acg.replace(stats={**acg.stats, "fidelity": fidelity})
    acg_io.save(acg, out / "acg")
    result: dict[str, Any] = {
        "path": str(out / "acg"),
        "seconds": round(stats["seconds"]["total"], 1),
        "layers": stats["layers"],
        "replacement": fidelity,
        "exact": {},
    }
    reference = load(model, "float64").original(tokens)
    exact = lower(acg, keep_errors=True, dtype="float64")
    for backend in codegen.BACKENDS:
        err.print(f"[4/6] compiling the exact ACG -> {backend} ...")
        path = codegen.compile(exact, out / "acg-exact" / backend, backend, title=f"{model} ACG (exact)")
        got = np.asarray(codegen.load(path)(tokens))
        result["exact"][backend] = {"path": str(path), "max_abs_err": float(np.abs(got - reference).max())}
    keep = {
        layer: sorted(np.argsort(-acg.usage[f"feat_mass.L{layer}"], kind="stable")[:12].tolist())
        for layer in range(torch_model.cfg.n_layers)
    }
    circuit = unroll(acg, keep, min_weight=0.1, max_terms=6)
    path = codegen.compile(circuit, out / "circuit", "python", title=f"{model}: its 12 most used features per layer")
    from acg.codegen.importer import import_code
    from acg.ir.serialize import content_hash, graph_to_dict, tensor_bytes

    imported, _ = import_code(path / "model.py")  # edit the file and `acg import-code` brings the edits back
    same = content_hash(graph_to_dict(imported), tensor_bytes(imported)) == content_hash(
        graph_to_dict(circuit), tensor_bytes(circuit)
    )
    result["circuit"] = {
        "path": str(path / "model.py"),
        "n_features": sum(map(len, keep.values())),
        "imports_back_identical": same,
    }
    result["distilled"] = _demo_roundtrip(torch_model, acg, out)
    return result


def _demo_roundtrip(torch_model, acg, out: Path) -> dict[str, Any]:
    """Round-trip the captured ACG (also with layer 0's unused QK pairs blocked) and its `code` circuit to dense
    checkpoints; evaluate them next to the original and the replacement model (task_acc, asr, n_params)."""
    from acg.roundtrip import dense
    from acg.roundtrip.backdoor import BLOCKED, CIRCUIT_MAX_MLP, blocked_roundtrip
    from acg.roundtrip.evaluate import evaluate

    err.print("[5/6] distilling the code circuit and round-tripping to dense checkpoints ...")
    bound = dense.mlp_feature_budget(torch_model, acg, CIRCUIT_MAX_MLP)  # the table's bound on its MLP parameters
    circ, *_ = _extract(  # the quick elimination: the demo's minutes
        torch_model, acg, "code", None, 2000, 0.01, "circuit:code", quick=True, max_features=bound
    )
    rows: dict[str, Any] = {}
    models = {}
    candidates = [
        ("original", torch_model, None),
        ("ACG replacement", dense.to_dense(acg), None),
        ("roundtrip full", *_rt(dense, acg, dense.select_captured(acg), out / "roundtrip-full")),
    ]
    blocked = blocked_roundtrip(acg, lambda s: err.print(f"({s})"))  # where the model's shape allows it
    if blocked is not None:
        candidates.append(("roundtrip full" + BLOCKED, *_save(dense, blocked, out / "roundtrip-pairs")))
    candidates.append(("roundtrip code", *_rt(dense, acg, circ.selection, out / "roundtrip-code")))
    for name, model, report in candidates:
        e = evaluate(model, n=1000, n_backdoor_per_task=200)
        rows[name] = {"task_acc": e["task_acc"], "asr": e["asr"], **dense.n_params(model)}
        models[name] = model
        if report is not None:
            rows[name]["path"] = report["out"]
    err.print("[6/6] writing the HTML report (monitor, circuit drawing, diffs, explanation tree) ...")
    del models["original"]
    path = _write_report(torch_model, acg, out / "report.html", models, circ, rows, str(acg.meta.get("model", "")))
    mlp_share = rows["roundtrip code"]["n_params_mlp"] / rows["original"]["n_params_mlp"]
    return {"rows": rows, "circuit": {**circ.report, "mlp_share": mlp_share}, "report": str(path)}


def _saved_bench(name: str, results: Path = Path("bench/results")) -> dict[str, Any] | None:
    """The 5% backdoor table's rows for model `name` (`report.load_bench`): the README's table
    (`backdoor-NAME-5pct-table.json`) where there is one, else the model's earlier 5% run; None without either."""
    from acg.roundtrip import report

    saved = (report.load_bench(results / f"backdoor-{name}-5pct{kind}.json", name) for kind in ("-table", ""))
    return next((b for b in saved if b is not None), None)


def _write_report(torch_model, acg, path: Path, candidates=None, circuit=None, rows=None, name: str = "") -> Path:
    """The demo's report; its monitor profiles the whole fitting corpus (10,000 prompts), as bench/monitor.py's
    second table does."""
    from acg.roundtrip import report

    bench = _saved_bench(name)
    data = report.collect(
        name, torch_model, acg, path.parent, candidates, circuit, rows, bench, 10_000, log=lambda s: err.print(s)
    )
    return report.write(data, path)


@app.command("report")
def report_cmd(
    model: Annotated[str, typer.Argument(help="testbed name or checkpoint folder the ACG was fitted for")],
    acg_dir: Annotated[Path, typer.Option("--acg", help="the ACG folder (`acg fit`)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="the HTML file to write")] = Path("runs/report.html"),
    bench: Annotated[
        Path | None, typer.Option(help="a bench/backdoor.py JSON whose FT / FP / Scratch asr the report shows")
    ] = None,
    profile: Annotated[int, typer.Option(help="monitor profile: clean testbed prompts (0: the ACG's usage)")] = 0,
) -> None:
    """One self-contained HTML report: fit metrics, task_acc and asr of the original, the replacement model and
    the round trips, KL histogram, monitor scores, the code circuit drawn and as code, diffs, an explanation tree."""
    from acg.roundtrip import report

    torch_model, acg = _model_and_acg(model, acg_dir)
    name = str(acg.meta.get("model", model))
    bench_data = report.load_bench(bench, name) if bench is not None else None
    if bench is not None and bench_data is None:
        raise ACGError(f"{bench}: holds no 5% backdoor results for {name}")
    data = report.collect(
        name, torch_model, acg, out.parent, bench=bench_data, profile_prompts=profile, log=lambda s: err.print(s)
    )
    report.write(data, out)
    err.print(f"report: {out}")


def _rt(dense, acg, selection, path: Path):
    return _save(dense, dense.roundtrip(acg, selection), path)


def _save(dense, roundtrip, path: Path):
    """A `dense.roundtrip` result's checkpoint written to `path`: (model, report with `out`)."""
    model, _, report = roundtrip
    report["out"] = str(path)
    dense.save(model, path, report)
    return model, report


def _print_demo_acg(model: str, r: dict[str, Any]) -> None:
    from acg.roundtrip import report

    Console().print(layer_table(r["layers"], f"ACG of {model}: fitted in {r['seconds']:.0f} s"))
    f = r["replacement"]
    err.print(
        f"replacement model (every MLP its transcoder, errors dropped): agreement "
        f"{f['agreement']:.4f}, kl {f['kl']:.4f}; task_acc "
        + ", ".join(f"{t} {f['task_acc'][t]:.3f} (orig {f['task_acc_original'][t]:.3f})" for t in f["task_acc"])
    )
    err.print(
        "exact ACG (error terms kept), float64, max_abs_err vs the original: "
        + ", ".join(f"{b} {x['max_abs_err']:.1e}" for b, x in r["exact"].items())
    )
    err.print(
        f"a readable circuit of {r['circuit']['n_features']} features: {r['circuit']['path']} (imported back with "
        f"`acg import-code`: {'the same IR, byte for byte' if r['circuit']['imports_back_identical'] else 'DIFFERS'})"
    )
    d = r["distilled"]
    c = d["circuit"]
    bound = c.get("budget") or {}
    met = bound["met"] if bound.get("cut") else c["target_met"]  # a cut circuit: the target after the cut
    table = Table(
        box=box.SIMPLE,
        pad_edge=False,
        title=f"distilled and round-tripped: task_acc (vars .. agree), asr (token .. phrase); the code circuit keeps"
        f" {c['k']} features ({c['fraction']:.1%}{report.cut_note(c)}; MLP {c['mlp_share']:.1%} of the original's),"
        f" faithfulness target {'met' if met else 'NOT met'}",
    )
    rows = d["rows"]
    first = next(iter(rows.values()))
    table.add_column("model", no_wrap=True)
    for col in [*(t.split(".")[-1] for t in first["task_acc"]), *first["asr"], "params"]:  # compact: 80 columns
        table.add_column(col, justify="right", min_width=5)
    for name, row in rows.items():
        cells = [f"{v:.3f}" for v in row["task_acc"].values()] + [f"{v:.3f}" for v in row["asr"].values()]
        table.add_row(name, *cells, f"{row['n_params'] / 1000:.0f}k")
    Console().print(table)


# ---------------------------------------------------------------------------------------------------------- entry


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM becomes an exception, so half-written outputs are removed on the way out (see acg.ir.atomic)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():

        def stop(signum, frame):
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; acg's own errors become one paragraph on stderr and exit status 2."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    _exit_cleanly_on_sigterm()
    try:
        app(args=argv, prog_name="acg", standalone_mode=False)
    except ACGError as e:
        if debug:
            raise
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        return 130
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:  # click usage errors carry their own exit code (typer vendors its own click)
        show, code = getattr(e, "show", None), getattr(e, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            return code
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
