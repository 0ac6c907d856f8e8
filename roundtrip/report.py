"""The HTML report: one self-contained file (no network, no JavaScript) with what a user would rather see than read.

`collect` measures what the report shows (or takes what the demo already measured); `render` writes the page:
the model, fit metrics per layer, plots (per-layer nmse and l0; task_acc of original vs replacement vs round trips;
asr next to fine-pruning; a KL histogram; monitor score distributions), a drawing of a task circuit (SVG), an excerpt
of the circuit's readable code, the diff tables, and an explanation tree of nested `<details>`: an answer logit, the
features that drive it, their own inputs, each with its label, attribution and example contexts.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from acg.compiler.acg import ACG
from acg.ir.atomic import atomic_file
from acg.roundtrip.diff import NodeModel, Nodes

# --------------------------------------------------------------------------------------------- explanation tree


def explanation_tree(
    acg: ACG, ids: Sequence[int], answer: int, depth: int = 2, width: int = 4, names: Sequence[str] | None = None
) -> dict[str, Any]:
    """The answer logit (minus the mean logit) at the last position, the `width` nodes with the largest gradient x
    activation attribution to it (features at any position, error terms, the embeddings at a position), and, to
    `depth`, the same for each feature's activation in turn. Computed on the exact node model (errors kept)."""
    nm = NodeModel(acg)
    names = names or [str(i) for i in range(acg.cfg.d_vocab)]
    toks = torch.as_tensor([list(ids)])
    embed: dict[str, torch.Tensor] = {}

    def grab(mod, args):
        x = args[0]
        x.retain_grad()
        embed["x"] = x

    handle = nm.model.blocks[0].register_forward_pre_hook(grab)
    try:
        logits, saved = nm.run(toks, Nodes(None, True), keep=True)
    finally:
        handle.remove()
    feats, errs = saved["features"], saved["errors"]
    leaves = [*feats, *errs, embed["x"]]

    def children(target: torch.Tensor, below: int) -> list[dict[str, Any]]:
        grads = torch.autograd.grad(target, leaves, retain_graph=True, allow_unused=True)
        g_f, g_e, g_x = grads[: len(feats)], grads[len(feats) : -1], grads[-1]
        rows = []
        for layer in range(below):
            if g_f[layer] is not None:
                a = (feats[layer] * g_f[layer])[0].detach().numpy()
                for p, i in zip(*np.nonzero(a), strict=True):
                    rows.append(("feature", layer, int(p), int(i), float(a[p, i])))
            if g_e[layer] is not None:
                a = (errs[layer] * g_e[layer])[0].sum(-1).detach().numpy()
                rows += [("error", layer, int(p), -1, float(a[p])) for p in np.flatnonzero(a)]
        if g_x is not None:
            a = (embed["x"] * g_x)[0].sum(-1).detach().numpy()
            rows += [("embedding", -1, int(p), -1, float(a[p])) for p in range(len(a))]
        rows.sort(key=lambda r: -abs(r[4]))
        return [node(*r, depth_left=None) for r in rows[:width]]

    def node(kind, layer, pos, idx, attribution, depth_left) -> dict[str, Any]:
        out = {"kind": kind, "layer": layer, "position": pos, "attribution": attribution}
        if kind == "feature":
            fid = f"L{layer}.f{idx}"
            info = acg.labels.get(fid, {})
            out.update(
                id=fid,
                label=info.get("label", fid),
                activation=float(feats[layer][0, pos, idx].detach()),
                contexts=[" ".join(c["tokens"]) for c in info.get("contexts", [])[:3]],
                target=(layer, pos, idx),
            )
        elif kind == "error":
            out.update(id=f"L{layer}.err", label="what the dictionary misses here")
        else:
            out.update(id=f"embed@{pos}", label=f"token {names[ids[pos]]!r} at position {pos}")
        return out

    def expand(n: dict[str, Any], left: int) -> None:
        target = n.pop("target", None)
        if target is None or left == 0:
            n["children"] = []
            return
        layer, pos, idx = target
        n["children"] = children(feats[layer][0, pos, idx], layer)
        for c in n["children"]:
            expand(c, left - 1)

    root_value = logits[0, -1, answer] - logits[0, -1].mean()
    root = {
        "kind": "logit",
        "id": f"logit[{names[answer]}]",
        "label": f"the logit of {names[answer]!r} (minus the mean logit) after {' '.join(names[i] for i in ids)!r}",
        "attribution": float(root_value.detach()),
        "children": children(root_value, acg.cfg.n_layers),
    }
    for c in root["children"]:
        expand(c, depth - 1)
    return root


# ----------------------------------------------------------------------------------------------- circuit drawing


def circuit_graph(acg: ACG, scores: Sequence[np.ndarray], per_layer: int = 6, per_node: int = 3) -> dict[str, Any]:
    """The top `per_layer` features of each layer by circuit score, and the strongest edges between them: the
    virtual weights from one layer's features into the next layer's encoders (layer-norm weights folded)."""
    from acg.compiler.lower import lower

    top = [np.sort(np.argsort(-np.asarray(s), kind="stable")[:per_layer]) for s in scores]
    graph = lower(acg, keep_errors=False, dtype="float64")
    nodes = [
        {
            "id": f"L{layer}.f{int(i)}",
            "layer": layer,
            "label": acg.label(f"L{layer}.f{int(i)}"),
            "score": float(scores[layer][i]),
        }
        for layer, idx in enumerate(top)
        for i in idx
    ]
    edges = []
    for layer in range(1, acg.cfg.n_layers):
        for src in range(layer):
            V = graph.tensors.get(f"V.L{layer}.enc.mlp{src}")
            if V is None:
                continue
            for j in top[layer]:
                w = V[top[src], j]
                for k in np.argsort(-np.abs(w))[:per_node]:
                    if abs(w[k]) > 0:
                        edges.append(
                            {
                                "source": f"L{src}.f{int(top[src][k])}",
                                "target": f"L{layer}.f{int(j)}",
                                "weight": float(w[k]),
                            }
                        )
    return {"nodes": nodes, "edges": edges}


NODE_COLOUR = "#ffd54f"  # the circuit's nodes (the rendering test looks for it)


def circuit_svg(g: dict[str, Any]) -> str:
    """The circuit as an SVG drawing (matplotlib): one column per layer, edges by weight (blue +, red -)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({n["layer"] for n in g["nodes"]})
    pos = {}
    for layer in layers:
        col = [n for n in g["nodes"] if n["layer"] == layer]
        for r, n in enumerate(col):
            pos[n["id"]] = (layer, -(r - (len(col) - 1) / 2))
    height = max(3.0, 0.75 * max(sum(n["layer"] == la for n in g["nodes"]) for la in layers))
    fig, ax = plt.subplots(figsize=(3.6 * len(layers) + 1, height))
    wmax = max([abs(e["weight"]) for e in g["edges"]] or [1.0])
    for e in g["edges"]:
        (x0, y0), (x1, y1) = pos[e["source"]], pos[e["target"]]
        ax.plot(
            [x0, x1],
            [y0, y1],
            color="tab:blue" if e["weight"] > 0 else "tab:red",
            lw=0.5 + 3.5 * abs(e["weight"]) / wmax,
            alpha=0.6,
            zorder=1,
        )
    for n in g["nodes"]:
        x, y = pos[n["id"]]
        ax.scatter([x], [y], s=160, color=NODE_COLOUR, edgecolor="black", zorder=2)
        ax.annotate(
            f"{n['id']}\n{n['label'][:34]}", (x, y), xytext=(8, 0), textcoords="offset points", fontsize=7, va="center"
        )
    ax.set_xticks(layers, [f"layer {la}" for la in layers])
    ax.set_yticks([])
    ax.set_xlim(min(layers) - 0.2, max(layers) + 0.9)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title("task circuit: top features per layer, edges = virtual weights (blue +, red -)", fontsize=9)
    return _svg(fig, "circuit")


def code_excerpt(source: str, lines: int = 40) -> str:
    """The definitions of the last layer's first features in a readable-Python module."""
    rows = source.splitlines()
    starts = [i for i, r in enumerate(rows) if re.match(r"\s+f(\d+)_\d+_pre = ", r)]
    if not starts:
        return "\n".join(rows[:lines])
    last_layer = max(int(re.match(r"\s+f(\d+)_", rows[i]).group(1)) for i in starts)
    first = next(i for i in starts if rows[i].lstrip().startswith(f"f{last_layer}_"))
    return "\n".join(rows[first : first + lines])


# ------------------------------------------------------------------------------------------------------- plots


def _svg(fig, element_id: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    return text.replace("<svg", f'<svg id="{element_id}" class="figure"', 1)


def _figure(draw: Callable[[Any], None], element_id: str, size=(6.0, 3.2)) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "acg"  # deterministic ids
    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    return _svg(fig, element_id)


def plot_layers(layers: list[dict[str, Any]]) -> str:
    def draw(ax):
        x = [r["layer"] for r in layers]
        ax.bar([i - 0.2 for i in x], [r["nmse"] for r in layers], width=0.4, label="normalised MSE", color="tab:blue")
        ax.set_ylabel("normalised MSE")
        ax2 = ax.twinx()
        ax2.bar([i + 0.2 for i in x], [r["l0"] for r in layers], width=0.4, label="l0", color="tab:orange")
        ax2.set_ylabel("l0 (active features per token)")
        ax.set_xticks(x, [f"layer {i}" for i in x])
        ax.set_title("fit per layer: nmse (blue), l0 (orange)", fontsize=9)

    return _figure(draw, "fig-layers")


def plot_grouped(rows: dict[str, dict[str, float]], title: str, element_id: str, ylabel: str) -> str:
    """Bars: one group per column key, one bar per row (method)."""
    methods = list(rows)
    keys = list(next(iter(rows.values())))

    def draw(ax):
        w = 0.8 / len(methods)
        for m, method in enumerate(methods):
            ax.bar(
                [k + (m - (len(methods) - 1) / 2) * w for k in range(len(keys))],
                [rows[method][key] for key in keys],
                width=w,
                label=method,
            )
        ax.set_xticks(range(len(keys)), keys, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title(title, fontsize=9)

    return _figure(draw, element_id, (7.0, 3.4))


def plot_hist(series: dict[str, np.ndarray], title: str, element_id: str, xlabel: str, log: bool = False) -> str:
    def draw(ax):
        allv = np.concatenate([np.asarray(v, dtype=float) for v in series.values()])
        lo, hi = (np.log10(max(allv[allv > 0].min(), 1e-8)), np.log10(max(allv.max(), 1e-8))) if log else (0, 1)
        for name, v in series.items():
            v = np.asarray(v, dtype=float)
            if log:
                ax.hist(np.log10(np.clip(v, 10**lo, None)), bins=40, range=(lo, hi + 1e-9), alpha=0.55, label=name)
            else:
                ax.hist(v, bins=40, range=(float(allv.min()), float(allv.max()) + 1e-9), alpha=0.55, label=name)
        ax.set_xlabel(("log10 " if log else "") + xlabel)
        ax.set_ylabel("prompts")
        ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)

    return _figure(draw, element_id)


# ------------------------------------------------------------------------------------------------------ render


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; line-height: 1.4 }
h1 { font-size: 1.6em } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0 } td, th { border: 1px solid #ddd;
padding: 2px 6px; text-align: left } th { background: #f4f4f4 }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; font-size: .78em }
details { margin-left: 1.2em } summary { cursor: pointer } .ctx { color: #666; font-size: .85em }
.pos { color: #1f5fa8 } .neg { color: #b02020 } svg.figure { max-width: 100%; height: auto; display: block }
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def table_html(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def tree_html(n: dict[str, Any], open_: bool = True) -> str:
    sign = "pos" if n["attribution"] >= 0 else "neg"
    where = "" if n["kind"] == "logit" else f" at position {n['position']}"
    head = (
        f"<summary><b>{_e(n['id'])}</b>{_e(where)}: {_e(n['label'])} "
        f"<span class='{sign}'>({n['attribution']:+.3f})</span></summary>"
    )
    ctx = "".join(f"<div class='ctx'>e.g. {_e(c)}</div>" for c in n.get("contexts", []))
    kids = "".join(tree_html(c, False) for c in n.get("children", []))
    return f"<details{' open' if open_ else ''}>{head}{ctx}{kids}</details>"


def render(data: dict[str, Any]) -> str:
    """The page for what `collect` gathered."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>acg report: {_e(data['model'])}</title>"
        f"<style>{CSS}</style></head><body>"
    ]
    parts.append(f"<h1>acg report: {_e(data['model'])}</h1>")
    cfg = data["config"]
    parts.append("<h2>The model</h2>" + table_html(["field", "value"], [[k, v] for k, v in cfg.items()]))
    fit = data["fit"]
    parts.append("<h2>The fitted ACG</h2>")
    parts.append(
        table_html(
            ["layer", "n_features", "l0", "nmse", "dead"],
            [
                [r["layer"], r["n_features"], f"{r['l0']:.1f}", f"{r['nmse']:.4f}", f"{r['dead_fraction']:.3f}"]
                for r in fit["layers"]
            ],
        )
    )
    parts.append(plot_layers(fit["layers"]))
    rows = data["rows"]
    parts.append("<h2>Original, replacement, distilled, round-tripped</h2>")
    tasks = list(next(iter(rows.values()))["task_acc"])
    fams = list(next(iter(rows.values()))["asr"])
    parts.append(
        table_html(
            ["model", *tasks, *(f"asr {f}" for f in fams), "n_params"],
            [
                [
                    m,
                    *(f"{r['task_acc'][t]:.3f}" for t in tasks),
                    *(f"{r['asr'][f]:.3f}" for f in fams),
                    f"{r['n_params']:,}",
                ]
                for m, r in rows.items()
            ],
        )
    )
    parts.append(
        plot_grouped({m: r["task_acc"] for m, r in rows.items()}, "task_acc per task", "fig-task-acc", "task_acc")
    )
    asr_rows = {m: r["asr"] for m, r in rows.items()}
    note = "this run"
    if data.get("bench"):
        b = data["bench"]
        for method in ("FT", "FP", "Scratch"):
            if method in b["rows"]:
                asr_rows[f"{method} (bench)"] = b["rows"][method]
        note = f"this run; FT / FP / Scratch from bench/backdoor.py ({_e(b['what'])})"
    parts.append(plot_grouped(asr_rows, f"asr per backdoor family ({note})", "fig-asr", "asr"))
    parts.append("<h2>KL(original || candidate) at the answer position</h2>")
    parts.append(
        plot_hist(data["kl"], "per-prompt KL, held-out prompts of every task", "fig-kl", "KL (nats)", log=True)
    )
    if data.get("monitor"):
        mon = data["monitor"]
        parts.append(
            f"<h2>Pathway monitor</h2><p>Profile: {_e(mon.get('profile', 'usage'))} statistics of "
            f"{_e(mon.get('profile_prompts'))} clean fitting prompts; held-out prompts below.</p>"
        )
        parts.append(
            table_html(
                ["family", "monitor_auroc", "detection at 1% FP"],
                [[f, f"{v['auroc']:.3f}", f"{v['detection']:.3f}"] for f, v in mon["families"].items()],
            )
        )
        parts.append(
            plot_hist(
                {k: np.asarray(v) for k, v in mon["scores"].items()},
                "monitor score: clean vs triggered held-out prompts",
                "fig-monitor",
                "score (1 = the clean 99th percentile)",
                log=True,
            )
        )
    if data.get("circuit"):
        c = data["circuit"]
        parts.append(f"<h2>The {_e(c['task'])} circuit</h2><p>{_e(c['summary'])}</p>")
        parts.append(c["svg"])
        parts.append(f"<h3>Its readable code (excerpt of {_e(c['code_path'])})</h3><pre>{_e(c['code'])}</pre>")
    for title, d in data.get("diffs", {}).items():
        parts.append(f"<h2>Diff: {_e(title)}</h2>")
        parts.append(
            table_html(
                ["task", "n", "task_acc A", "task_acc B", "agreement", "kl"],
                [
                    [
                        t,
                        v["n"],
                        f"{v['task_acc']['a']:.3f}",
                        f"{v['task_acc']['b']:.3f}",
                        f"{v['agreement']:.3f}",
                        f"{v['kl']:.4f}",
                    ]
                    for t, v in d["tasks"].items()
                ],
            )
        )
        div = []
        for t, v in d["tasks"].items():
            for p in v["divergent"][:2]:
                why = ""
                if p.get("a_only") and p["a_only"]["nodes"]:
                    why = ", ".join(f"{r['node']} {r['attribution']:+.2f}" for r in p["a_only"]["nodes"][:3])
                div.append([t, p["prompt"], p["expected"], p["answer_a"], p["answer_b"], f"{p['kl']:.3f}", why])
        parts.append("<h3>Most divergent prompts</h3>")
        parts.append(table_html(["task", "prompt", "expected", "A", "B", "kl", "only in A, by attribution"], div))
    if data.get("tree"):
        parts.append("<h2>Why the model answers as it does: an explanation tree</h2>")
        parts.append(
            "<p>Gradient x activation on the exact node model (features and error terms); expand a node to "
            "see what drives it.</p>" + tree_html(data["tree"])
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def write(data: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_file(path) as f:
        f.write(render(data))
    return path


def cut_note(c: dict[str, Any]) -> str:
    """ ", cut from K to the MLP bound of N" where `circuit.extract`'s report `c` says the bound on its MLP parameters
    cut the circuit; "" where it fitted or had no bound."""
    bound = c.get("budget") or {}
    return f", cut from {bound['k_before']} to the MLP bound of {bound['max_features']}" if bound.get("cut") else ""


def circuit_summary(c: dict[str, Any], n_drawn: int) -> str:
    """The line under the report's circuit drawing, from `circuit.extract`'s report `c`: features kept (and, where
    they were cut to a bound on their MLP parameters, from how many: `cut_note`), task_acc against the original's."""
    return (
        f"{c['k']} features kept ({c['fraction']:.1%} of the dictionary{cut_note(c)}); task_acc "
        + ", ".join(f"{t} {v:.3f} (original {c['reference'][t]:.3f})" for t, v in c["task_acc"].items())
        + f"; drawn: the top {n_drawn} by attribution and their strongest edges."
    )


def collect(
    model_name: str,
    model: torch.nn.Module,
    acg: ACG,
    out: str | os.PathLike,
    candidates: dict[str, torch.nn.Module] | None = None,
    circuit: Any = None,
    rows: dict[str, Any] | None = None,
    bench: dict[str, Any] | None = None,
    profile_prompts: int = 0,
    n: int = 250,
    n_trig: int = 40,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Measure what the report shows. `candidates` maps names to models compared with the original (default: the
    replacement model and the two round trips, made here); `circuit` is the `code` circuit (extracted here if None)."""
    from acg import codegen
    from acg.compiler.labels import token_names
    from acg.compiler.unroll import unroll
    from acg.roundtrip import dense
    from acg.roundtrip import diff as diff_mod
    from acg.roundtrip.backdoor import BLOCKED, blocked_roundtrip, code_circuit
    from acg.roundtrip.evaluate import answer_logits, evaluate, kl_per_prompt
    from acg.roundtrip.monitor import Monitor, auroc, calibration_prompts, detection_at_fpr, testbed_profile
    from acg.zoo.tasks import BACKDOORS, TASKS, heldout, triggered

    out = Path(out)
    names = token_names(acg.cfg.d_vocab)
    decode = lambda ids: " ".join(names[i] for i in ids)  # noqa: E731
    if circuit is None:
        log("report: extracting the code circuit ...")
        from acg.zoo.tasks import Mixture, resolve_tasks

        stream = Mixture(tasks=resolve_tasks("code"), poison=False).stream(20_000)
        circuit = code_circuit(model, acg, [next(stream) for _ in range(2000)])
    if candidates is None:
        candidates = {
            "ACG replacement": dense.to_dense(acg),
            "roundtrip full": dense.roundtrip(acg, dense.select_captured(acg))[0],
        }
        blocked = blocked_roundtrip(acg, lambda s: log(f"report: {s}"))
        if blocked is not None:
            candidates["roundtrip full" + BLOCKED] = blocked[0]
        candidates["roundtrip code"] = dense.roundtrip(acg, circuit.selection)[0]
    if rows is None:
        log("report: evaluating the original and every candidate ...")
        rows = {}
        for name, m in {"original": model, **candidates}.items():
            e = evaluate(m, n=n, n_backdoor_per_task=n_trig)
            rows[name] = {"task_acc": e["task_acc"], "asr": e["asr"], "n_params": dense.n_params(m)["n_params"]}
    clean = [ex for t in TASKS for ex in heldout(t, n, 0)]
    ref = answer_logits(model, clean)
    kl = {name: kl_per_prompt(ref, answer_logits(m, clean)) for name, m in candidates.items()}
    log("report: scoring held-out prompts with the pathway monitor ...")
    mon = Monitor(acg, testbed_profile(acg, profile_prompts) if profile_prompts else None)
    calib = mon.calibrate(calibration_prompts(acg, 200, mon.profile.n_prompts))
    s_clean = mon.score([ex.ids for ex in clean])["score"]
    scores, families = {"clean": s_clean}, {}
    for f in BACKDOORS:
        s = mon.score([ex.ids for ex in triggered(f, max(1, n_trig // len(TASKS)) * 2, 0)])["score"]
        scores[f"triggered: {f}"] = s
        families[f] = {"auroc": auroc(s_clean, s), "detection": detection_at_fpr(s_clean, s, 0.01)[0]}
    log("report: drawing the circuit and writing its code ...")
    g = circuit_graph(acg, circuit.scores)
    keep = {
        layer: [int(n_["id"].split(".f")[1]) for n_ in g["nodes"] if n_["layer"] == layer]
        for layer in range(acg.cfg.n_layers)
    }
    code_dir = codegen.compile(
        unroll(acg, keep, min_weight=0.05, max_terms=6),
        out / "circuit-code",
        "python",
        title=f"{model_name}: the code circuit's top features",
    )
    code = (Path(code_dir) / "model.py").read_text()
    summary = circuit_summary(circuit.report, len(g["nodes"]))
    log("report: diffing the original against the round trips ...")
    data_sets = {t: heldout(t, max(50, n // 2), 0) for t in TASKS}
    data_sets.update({f"backdoor.{f}": triggered(f, max(1, n_trig // len(TASKS)), 0) for f in BACKDOORS})
    side_o = diff_mod.Side(model_name, "model", diff_mod.answer_fn(model), diff_mod.Nodes(None, True), acg)
    diffs = {}
    for name in ("roundtrip code", "roundtrip full"):
        if name in candidates:
            kept = circuit.selection.features if name == "roundtrip code" else dense.select_captured(acg).features
            side = diff_mod.Side(name, "roundtrip", diff_mod.answer_fn(candidates[name]), diff_mod.Nodes(kept, False))
            diffs[f"original vs {name}"] = diff_mod.diff(side_o, side, data_sets, acg, 3, 6, decode)
    log("report: building the explanation tree ...")
    ex = heldout("code.vars", 1, 3)[0]
    answer = int(answer_logits(model, [ex])[0].argmax())
    tree = explanation_tree(acg, ex.ids, answer, depth=2, width=6, names=names)
    return {
        "model": model_name,
        "config": {
            k: getattr(acg.cfg, k)
            for k in ("n_layers", "d_model", "n_heads", "d_mlp", "d_vocab", "n_ctx", "act_fn", "normalization_type")
        },
        "fit": {"layers": acg.stats.get("layers", [])},
        "rows": rows,
        "kl": kl,
        "monitor": {
            "families": families,
            "scores": scores,
            "calibration": calib,
            "profile": mon.profile.source,
            "profile_prompts": mon.profile.n_prompts,
        },
        "circuit": {
            "task": "code",
            "summary": summary,
            "svg": circuit_svg(g),
            "code": code_excerpt(code),
            "code_path": str(Path(code_dir) / "model.py"),
        },
        "diffs": diffs,
        "tree": tree,
        "bench": bench,
    }


def load_bench(path: str | os.PathLike, model: str, ratio: float = 0.05) -> dict[str, Any] | None:
    """The baselines' asr from a bench/backdoor.py JSON, when it holds this model at this ratio."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for entry in doc.get("results", []):
        if entry.get("model") == model and abs(entry.get("ratio", -1) - ratio) < 1e-9 and entry.get("summary"):
            rows = {m: {f: v["mean"] for f, v in r["asr"].items()} for m, r in entry["summary"].items()}
            return {"rows": rows, "what": f"{len(entry['runs'])} seed(s), {ratio:.0%} clean budget, mean"}
    return None
