"""Lowering: an ACG -> the feature-level IR.

Every read of the residual stream (a head's queries, keys and values; a transcoder's encoder; the unembedding) is
written as a sum over source feature groups of `activations @ virtual weights`, scaled by the layer norm's
per-position factor `s` and offset by a constant:

    pre = s * (sum_g F_g @ V_g) + c,       V_g = centre(D_g) @ (w[:, None] * R),   c = b_ln @ R + b_R

where `D_g` are the vectors group g writes (embedding rows, W_O, W_dec, ...), `w`, `b_ln` the layer norm's weights,
`R` the read (W_Q, W_enc, W_U, ...). Groups: `tok` (embedding rows), `pos`, `bias` (the sum of biases written so
far), `attn{l}` (each head's output, d_head values per head), `mlp{l}` (transcoder features), `err{l}` (what the
transcoder misses, kept only with `keep_errors`). The residual stream itself is still summed, because `s` depends on
all of it; with `keep_errors=False` it is the replacement model's own stream.

With `qk_tables`, the part of each head's score between sparse features (tokens, positions, transcoder features) is an
explicit table `T.L{l}` [n_heads, n, n] over (query feature, key feature) pairs, so that single pairs can be dropped;
the rest of the score stays factored. With `usage`, the ACG's usage statistics travel with the weights they describe
(`meta["usage"]`), for the `capture` pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from acg.compiler.acg import ACG
from acg.compiler.tlayout import ACT_OPS
from acg.ir.builder import GraphBuilder
from acg.ir.graph import Graph

SPARSE_KINDS = ("tok", "pos", "mlp")


@dataclass(frozen=True)
class Group:
    """A source of residual-stream writes: `kind` in tok/pos/bias/attn/mlp/err, its activations' IR value (None for
    tok/pos/bias, which are looked up), and its write matrix D [n, d_model]."""

    name: str
    kind: str
    value: str | None
    D: np.ndarray


def centre(D: np.ndarray, center: bool) -> np.ndarray:
    return D - D.mean(axis=-1, keepdims=True) if center else D


class _Lowering:
    def __init__(
        self, acg: ACG, keep_errors: bool, dtype: str, masks: dict[str, np.ndarray] | None, usage: bool, qk_tables: bool
    ):
        self.acg, self.keep_errors, self.dtype = acg, keep_errors, dtype
        self.cfg = acg.cfg
        self.w = acg.weights
        self.b = GraphBuilder()
        self.masks = masks or {}
        self.norm = self.cfg.normalization_type
        self.center = self.norm in ("LN", "LNPre")
        self.links: list[dict] = []
        self.with_usage = usage and bool(acg.usage)
        self.qk_tables = qk_tables
        self.usage_meta: dict[str, dict] = {}
        self.tokens = ""

    # ------------------------------------------------------------------------------------------------- helpers

    def const(self, name: str, arr: np.ndarray) -> str:
        arr = np.asarray(arr, dtype=np.float64)
        if name in self.masks:
            arr = arr * self.masks[name]
        return self.b.const(name, arr.astype(self.dtype), hint=name.replace(".", "_"))

    def attach(self, weight: str, usage: np.ndarray | None, kind: str) -> None:
        """Record `usage` (broadcastable to the weight) for the capture pass."""
        if not self.with_usage or usage is None:
            return
        name = f"usage.{weight}"
        self.b.tensors[name] = np.asarray(usage, dtype=np.float32)
        self.usage_meta[weight] = {"usage": name, "kind": kind}

    def ln_params(self, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        d = self.cfg.d_model
        w = self.w[f"{prefix}.w"] if self.norm in ("LN", "RMS") else np.ones(d)
        b = self.w[f"{prefix}.b"] if self.norm == "LN" else np.zeros(d)
        return w, b

    def scale(self, x: str, tag: str) -> str | None:
        if self.norm is None:
            return None
        return self.b.op("norm_scale", x, eps=float(self.cfg.eps), center=self.center, name=f"s_{tag}")

    def edge_usage(self, tag: str, g: Group, n_out: int) -> tuple[np.ndarray | None, str]:
        u = self.acg.usage
        if tag.endswith(".V") and f"ov.{tag[:-2]}" in u:  # OV entries: per head and source
            ov = u[f"ov.{tag[:-2]}"]  # (H, n_src over all groups)
            offset = self._offsets(tag)[g.name]
            rows = ov[:, offset : offset + len(g.D)]  # (H, n_g)
            return np.repeat(rows.T, self.cfg.d_head, axis=1), "ov"
        e = u.get(f"edge.{tag}.{g.name}")
        if e is None:
            return None, "edge"
        kind = "token" if g.kind in ("tok", "pos") and not tag.endswith(".enc") else "edge"
        return (e if e.ndim == 2 else e[:, None]), kind

    def _offsets(self, tag: str) -> dict[str, int]:
        """Where each source group's rows start in the concatenated `ov` statistics of this read."""
        out, n = {}, 0
        for link in self.acg.stats.get("read_sources", {}).get(tag, []):
            out[link[0]] = n
            n += link[1]
        return out

    def terms(self, groups: list[Group], prefix: str, R: np.ndarray, tag: str) -> list[str]:
        """F_g @ V_g for each group (unscaled)."""
        b = self.b
        w, _ = self.ln_params(prefix)
        wR = w[:, None] * R
        out = []
        for g in groups:
            V = centre(g.D, self.center) @ wR  # (n_g, n_out)
            name = f"V.{tag}.{g.name}"
            if g.kind == "tok":
                out.append(b.op("embed", self.const(name, V), self.tokens, name=f"{tag}_from_tok"))
            elif g.kind == "pos":
                out.append(b.op("pos_embed", self.const(name, V), self.tokens, name=f"{tag}_from_pos"))
            elif g.kind == "bias":
                out.append(self.const(name, V[0]))
            else:
                out.append(b.op("matmul", g.value, self.const(name, V), name=f"{tag}_from_{g.name}"))
            self.links.append({"weight": name, "source": g.name, "target": tag, "n": len(g.D)})
            if g.kind != "bias":
                usage, kind = self.edge_usage(tag, g, V.shape[1])
                self.attach(name, usage, kind)
        return out

    def combine(self, terms: list[str], s: str | None, c: np.ndarray | None, tag: str) -> str:
        b = self.b
        total = terms[0]
        for t in terms[1:]:
            total = b.op("add", total, t, name=f"{tag}_sum")
        if s is not None:
            total = b.op("mul", total, s, name=f"{tag}_scaled")
        if c is not None:
            total = b.op("add", total, self.const(f"c.{tag}", c), name=f"{tag}_pre")
        return total

    def read(self, x: str, groups: list[Group], prefix: str, R: np.ndarray, b_R: np.ndarray, tag: str) -> str:
        """s * sum_g F_g @ V_g + c for the read R [d_model, n_out] behind layer norm `prefix`."""
        _, b_ln = self.ln_params(prefix)
        return self.combine(self.terms(groups, prefix, R, tag), self.scale(x, tag), b_ln @ R + b_R, tag)

    # ----------------------------------------------------------------------------------------------- attention

    def attention(self, x: str, groups: list[Group], layer: int) -> str:
        cfg, w, b = self.cfg, self.w, self.b
        H, E, d, p = cfg.n_heads, cfg.d_head, cfg.d_model, f"blocks.{layer}"
        R = {m: w[f"{p}.attn.W_{m}"].transpose(1, 0, 2).reshape(d, H * E) for m in "QKV"}
        bR = {m: w[f"{p}.attn.b_{m}"].reshape(H * E) for m in "QKV"}
        sparse_names = self.acg.stats.get("qk_sources", {}).get(str(layer), ["tok", "pos"])
        sparse = [g for g in groups if self.qk_tables and g.name in sparse_names]
        dense = [g for g in groups if g not in sparse]

        def heads(v: str, m: str) -> str:
            v = b.op("reshape", v, shape=("batch", "seq", H, E))
            return b.op("transpose", v, perm=(0, 2, 1, 3), name=f"L{layer}_{m.lower()}")

        s = self.scale(x, f"L{layer}.Q")
        _, b_ln = self.ln_params(f"{p}.ln1")
        v = heads(
            self.combine(
                self.terms(groups, f"{p}.ln1", R["V"], f"L{layer}.V"), s, b_ln @ R["V"] + bR["V"], f"L{layer}.V"
            ),
            "V",
        )
        if not sparse:
            q = heads(
                self.combine(
                    self.terms(groups, f"{p}.ln1", R["Q"], f"L{layer}.Q"), s, b_ln @ R["Q"] + bR["Q"], f"L{layer}.Q"
                ),
                "Q",
            )
            k = heads(
                self.combine(
                    self.terms(groups, f"{p}.ln1", R["K"], f"L{layer}.K"), s, b_ln @ R["K"] + bR["K"], f"L{layer}.K"
                ),
                "K",
            )
            scores = b.op("einsum", q, k, equation="bhqe,bhke->bhqk", name=f"L{layer}_qk")
        else:
            scores = self.table_scores(x, s, sparse, dense, layer, R, bR, b_ln, heads)
        scores = b.op(
            "mul", scores, self.const(f"L{layer}.inv_scale", np.array(1.0 / cfg.attn_scale)), name=f"L{layer}_scores"
        )
        if cfg.attention_dir == "causal":
            scores = b.op("causal_mask", scores, name=f"L{layer}_masked")
        pattern = b.op("softmax", scores, axis=3, name=f"L{layer}_pattern")
        z = b.op("einsum", pattern, v, equation="bhqk,bhke->bhqe", name=f"L{layer}_z")
        return b.op(
            "reshape", b.op("transpose", z, perm=(0, 2, 1, 3)), shape=("batch", "seq", H * E), name=f"attn{layer}"
        )

    def table_scores(self, x, s, sparse, dense, layer, R, bR, b_ln, heads) -> str:
        """q.k = s_i s_j sum_{a,b} F_a(i) T[a,b] F_b(j)  (sparse pairs, explicit)  +  the factored rest."""
        cfg, b = self.cfg, self.b
        H, E = cfg.n_heads, cfg.d_head
        w1, _ = self.ln_params(f"blocks.{layer}.ln1")
        Q = {g.name: centre(g.D, self.center) @ (w1[:, None] * R["Q"]) for g in sparse}
        K = {g.name: centre(g.D, self.center) @ (w1[:, None] * R["K"]) for g in sparse}
        Qs = np.concatenate([Q[g.name] for g in sparse]).reshape(-1, H, E)  # (n, H, E)
        Ks = np.concatenate([K[g.name] for g in sparse]).reshape(-1, H, E)
        T = np.einsum("ahe,bhe->hab", Qs, Ks)  # (H, n, n)
        tname = f"T.L{layer}"
        T_const = self.const(tname, T)
        u = self.acg.usage.get(f"qk.L{layer}")
        if u is not None and u.shape == T.shape:
            self.attach(tname, u, "qk")
        n = T.shape[1]
        rows = b.op("reshape", b.op("transpose", T_const, perm=(1, 0, 2)), shape=(n, H * n), name=f"L{layer}_T_rows")
        start, G_terms, key_parts = 0, [], []
        for g in sparse:
            r = b.op("slice", rows, axis=0, start=start, stop=start + len(g.D))
            if g.kind == "tok":
                G_terms.append(b.op("embed", r, self.tokens))
                eye = self.b.const(f"eye.tok.{layer}", np.eye(len(g.D), dtype=self.dtype), hint="eye_tok")
                key_parts.append((start, len(g.D), b.op("embed", eye, self.tokens), "bkc"))
            elif g.kind == "pos":
                G_terms.append(b.op("pos_embed", r, self.tokens))
                eye = self.b.const(f"eye.pos.{layer}", np.eye(len(g.D), dtype=self.dtype), hint="eye_pos")
                key_parts.append((start, len(g.D), b.op("pos_embed", eye, self.tokens), "kc"))
            else:
                G_terms.append(b.op("matmul", g.value, r))
                key_parts.append((start, len(g.D), g.value, "bkc"))
            start += len(g.D)
        G = G_terms[0]
        for t in G_terms[1:]:
            G = b.op("add", G, t)
        G = b.op(
            "transpose", b.op("reshape", G, shape=("batch", "seq", H, n)), perm=(0, 2, 1, 3), name=f"L{layer}_qk_rows"
        )  # (b, H, q, n)
        table = None
        for start, size, F, spec in key_parts:
            part = b.op("slice", G, axis=3, start=start, stop=start + size)
            term = b.op("einsum", part, F, equation=f"bhqc,{spec}->bhqk")
            table = term if table is None else b.op("add", table, term)
        if s is not None:
            s_q = b.op("reshape", s, shape=("batch", 1, "seq", 1))
            s_k = b.op("reshape", s, shape=("batch", 1, 1, "seq"))
            table = b.op("mul", b.op("mul", table, s_q), s_k, name=f"L{layer}_qk_table")
        # the factored rest, with q = s qS + s qD + cq and k = s kS + s kD + ck (S: sparse groups, D: dense ones):
        # q.k = table + (s qS).(s kD) + (s qS).ck + (s qD).k + cq.k
        ln = f"blocks.{layer}.ln1"
        cq, ck = b_ln @ R["Q"] + bR["Q"], b_ln @ R["K"] + bR["K"]
        qS = heads(self.combine(self.terms(sparse, ln, R["Q"], f"L{layer}.Qs"), s, None, f"L{layer}.Qs"), "Qs")
        kS = self.combine(self.terms(sparse, ln, R["K"], f"L{layer}.Ks"), s, None, f"L{layer}.Ks")
        k_flat = kS
        if dense:
            kD = self.combine(self.terms(dense, ln, R["K"], f"L{layer}.Kd"), s, None, f"L{layer}.Kd")
            k_flat = b.op("add", kS, kD)
        k = heads(b.op("add", k_flat, self.const(f"c.L{layer}.K", ck)), "K")
        cq_h = self.const(f"c.L{layer}.Q", cq.reshape(H, E))
        ck_h = self.const(f"c.L{layer}.Kh", ck.reshape(H, E))
        t3 = b.op("reshape", b.op("einsum", qS, ck_h, equation="bhqe,he->bhq"), shape=("batch", H, "seq", 1))
        t5 = b.op("reshape", b.op("einsum", cq_h, k, equation="he,bhke->bhk"), shape=("batch", H, 1, "seq"))
        parts = [table, t3, t5]
        if dense:
            qD = heads(self.combine(self.terms(dense, ln, R["Q"], f"L{layer}.Qd"), s, None, f"L{layer}.Qd"), "Qd")
            parts.append(b.op("einsum", qS, heads(kD, "Kd"), equation="bhqe,bhke->bhqk"))
            parts.append(b.op("einsum", qD, k, equation="bhqe,bhke->bhqk"))
        total = parts[0]
        for i, part in enumerate(parts[1:], 1):
            total = b.op("add", total, part, name=f"L{layer}_qk" if i == len(parts) - 1 else None)
        return total

    # --------------------------------------------------------------------------------------------------- whole

    def run(self) -> Graph:
        cfg, w, b = self.cfg, self.w, self.b
        d = cfg.d_model
        u = self.acg.usage
        self.tokens = b.input("tokens", ("batch", "seq"), "int64")
        with b.scope("embed"):
            x = b.op(
                "add",
                b.op("embed", self.const("D.tok", w["embed.W_E"]), self.tokens, name="resid_tok"),
                b.op("pos_embed", self.const("D.pos", w["pos_embed.W_pos"]), self.tokens, name="resid_pos"),
                name="resid_0",
            )
            self.attach("D.tok", u.get("tok_count", None)[:, None] if "tok_count" in u else None, "token")
            self.attach("D.pos", u.get("pos_count", None)[:, None] if "pos_count" in u else None, "token")
        groups = [Group("tok", "tok", None, w["embed.W_E"]), Group("pos", "pos", None, w["pos_embed.W_pos"])]
        bias = np.zeros(d)
        for layer in range(cfg.n_layers):
            p = f"blocks.{layer}"
            with b.scope(f"{p}.attn"):
                src = groups + ([Group("bias", "bias", None, bias[None])] if np.any(bias) else [])
                z = self.attention(x, src, layer)
                W_O = w[f"{p}.attn.W_O"].reshape(-1, d)
                out = b.op("matmul", z, self.const(f"D.attn{layer}", W_O), name=f"L{layer}_attn_write")
                bias = bias + w[f"{p}.attn.b_O"]
                x = b.op(
                    "add",
                    b.op("add", x, out),
                    self.const(f"b.attn{layer}", w[f"{p}.attn.b_O"]),
                    name=f"resid_mid_{layer}",
                )
                groups = groups + [Group(f"attn{layer}", "attn", z, W_O)]
            if cfg.attn_only:
                continue
            tc = self.acg.transcoders[layer]
            with b.scope(f"{p}.mlp"):
                src = groups + [Group("bias", "bias", None, bias[None])]
                pre = self.read(x, src, f"{p}.ln2", tc.W_enc, tc.b_enc, f"L{layer}.enc")
                count = u.get(f"feat_count.L{layer}")
                self.attach(f"c.L{layer}.enc", count, "feature")
                if tc.act == "jumprelu":
                    f = b.op("jumprelu", pre, self.const(f"L{layer}.threshold", tc.threshold), name=f"mlp{layer}")
                else:
                    f = b.op(tc.act, pre, name=f"mlp{layer}")
                recon = b.op(
                    "add",
                    b.op("matmul", f, self.const(f"D.mlp{layer}", tc.W_dec)),
                    self.const(f"b.mlp{layer}", tc.b_dec),
                    name=f"L{layer}_recon",
                )
                self.attach(f"D.mlp{layer}", None if count is None else count[:, None], "feature")
                groups = groups + [Group(f"mlp{layer}", "mlp", f, tc.W_dec)]
                bias = bias + tc.b_dec
                if self.keep_errors:
                    mlp_out = self.dense_mlp(x, layer)
                    err = b.op("sub", mlp_out, recon, name=f"err{layer}")
                    groups = groups + [Group(f"err{layer}", "err", err, np.eye(d))]
                    x = b.op("add", x, mlp_out, name=f"resid_{layer + 1}")
                else:
                    x = b.op("add", x, recon, name=f"resid_{layer + 1}")
        with b.scope("unembed"):
            src = groups + [Group("bias", "bias", None, bias[None])]
            logits = self.read(x, src, "ln_final", w["unembed.W_U"], w["unembed.b_U"], "logits")
            b.rename(logits, "logits")
        meta = {
            "family": "acg",
            "config": cfg.to_dict(),
            "keep_errors": self.keep_errors,
            "exact_features": self.acg.exact,
            "qk_tables": self.qk_tables,
            "title": self.acg.meta.get("title", "ACG"),
            "usage_links": self.links,
        }
        if self.usage_meta:
            meta["usage"] = self.usage_meta
        return b.build(["logits"], meta=meta)

    def dense_mlp(self, x: str, layer: int) -> str:
        """The original MLP on the actual stream (for the error term)."""
        b, w, p = self.b, self.w, f"blocks.{layer}"
        y = x
        if self.norm is not None:
            y = b.op("norm", x, eps=float(self.cfg.eps), center=self.center)
            wl, bl = self.ln_params(f"{p}.ln2")
            y = b.op("add", b.op("mul", y, self.const(f"{p}.ln2.w", wl)), self.const(f"{p}.ln2.b", bl))
        pre = b.op(
            "add",
            b.op("matmul", y, self.const(f"{p}.mlp.W_in", w[f"{p}.mlp.W_in"])),
            self.const(f"{p}.mlp.b_in", w[f"{p}.mlp.b_in"]),
        )
        if self.cfg.act_fn == "jumprelu":
            post = b.op("jumprelu", pre, self.const(f"{p}.mlp.threshold", w[f"{p}.mlp.threshold"]))
        else:
            post = b.op(ACT_OPS[self.cfg.act_fn], pre)
        return b.op(
            "add",
            b.op("matmul", post, self.const(f"{p}.mlp.W_out", w[f"{p}.mlp.W_out"])),
            self.const(f"{p}.mlp.b_out", w[f"{p}.mlp.b_out"]),
            name=f"L{layer}_mlp_out",
        )


def lower(
    acg: ACG,
    *,
    keep_errors: bool = False,
    dtype: str = "float32",
    masks: dict[str, np.ndarray] | None = None,
    usage: bool = False,
    qk_tables: bool = False,
) -> Graph:
    """The feature-level IR of `acg`: exact with `keep_errors`, the pure replacement model without. `masks` multiply
    named weight tensors (0 drops an entry); `usage` attaches usage statistics for the `capture` pass; `qk_tables`
    makes the sparse-feature part of each attention score an explicit, prunable pair table."""
    return _Lowering(acg, keep_errors, dtype, masks, usage, qk_tables).run()
