"""Cost models: what the allocation counts per branch — parameters (the paper's) or predicted ms.

P3B's allocation divides block importance by a branch's kept cost and solves the keep ratios κ
against a budget of total cost. `ParameterCosts` counts the branch's parameters (|wᵢ|, Appendix A)
and turns a budget over all parameters into one over branch parameters; the parameters P3B never
prunes (patch embedding, tokens, final norm, head) count against it. `LatencyCosts` counts the
branch's predicted milliseconds on a latency table's runtime: importance per ms, κ as a fraction
of the branch's full-width time, the budget (target − the branch-free model's time) / Σ
full-width branch times.

A branch costs its Linear layers plus what leaves with it when it is removed: its LayerNorm and
LayerScale (under the total-parameter budget), or its fixed per-branch time (latency). Each
cost model gives the cost of keeping the top k elements of a branch along any order of its gate
elements (`curve`), for attention with whole heads the cost of every (heads, head dims) pair
(`grid`), and the smallest useful width below which a branch is removed instead (`useful`).
"""

from __future__ import annotations

import torch

from p3bkit.errors import P3BError
from p3bkit.models.cost import BranchKind, BranchWidths, branch_params
from p3bkit.models.gates import GatedViT


def branch_budget_share(
    keep: float, branch_total: float, other_params: float, scope: str, smallest: float = 0.0
) -> float:
    """The fraction of branch parameters to keep so that `keep` holds for the chosen scope.

    scope "total": keep·(branch_total + other) − other over branch_total (the paper's definition, where the
    unprunable parameters count against the budget); "blocks": `keep` itself.

    Raises:
        P3BError: when the unprunable parameters alone exceed the total budget, or leave less than
            `smallest` (the cost of the smallest branch width) for the branches.
    """
    if scope == "blocks":
        return keep
    if scope != "total":
        raise P3BError(f"budget scope must be 'total' or 'blocks', got {scope!r}")
    ratio = (keep * (branch_total + other_params) - other_params) / branch_total
    if ratio * branch_total < max(smallest, 1e-12):
        raise P3BError(
            f"keeping {100 * keep:.1f}% of all {branch_total + other_params:,.0f} parameters leaves nothing "
            f"for the blocks: {other_params:,.0f} parameters (patch embedding, tokens, norms, head) are "
            f"never pruned; raise --keep or use --budget blocks"
        )
    return min(ratio, 1.0)


def _counts(order_gate: torch.Tensor, names: list[str]) -> torch.Tensor:
    """[n+1, gates]: how many elements of each gate the top k of the order keep, k = 0..n."""
    n = order_gate.numel()
    counts = torch.zeros(n + 1, len(names), dtype=torch.long)
    counts[1:] = torch.nn.functional.one_hot(order_gate, len(names)).cumsum(0)
    return counts


def kept_cost_curve(
    order_gate: torch.Tensor,
    names: list[str],
    kind: BranchKind,
    num_heads: int,
    bias: tuple[bool, bool],
    full: dict[str, int],
) -> torch.Tensor:
    """Branch Linear parameters when keeping the top-k elements, for every k = 0..n (vectorised).

    `order_gate[p]` is the gate id (index into `names`) of the p-th most important element.
    Gates absent from `names` (not pruned) stay at their `full` width.
    """
    counts = _counts(order_gate, names)
    col = {
        name: counts[:, names.index(name)] if name in names else torch.full((len(counts),), full[name]) for name in full
    }
    inner_key = "head_dim" if kind == "attn" else "hidden"
    heads = col["heads"] if kind == "attn" and "heads" in names else None
    return branch_params(BranchWidths(kind, col["in"], col[inner_key], col["out"], heads), num_heads, *bias).long()


class ParameterCosts:
    """Branch costs in parameters; `budget_share` is the fraction of branch cost to keep."""

    def __init__(self, gated: GatedViT, keep: float, scope: str, remove_below: float = 0.0) -> None:
        self.gated, self.spec, self.scope = gated, gated.spec, scope
        self.branches = [b for _, b in gated.branches()]
        # a branch's norm and LayerScale leave with it: part of its cost under the total budget
        self.norms = torch.tensor([self._norm_params(i) for i in range(len(self.branches))], dtype=torch.float64)
        self.fixed = self.norms if scope == "total" else torch.zeros_like(self.norms)
        self.linear_full = torch.tensor([self._params(b, full=True) for b in self.branches], dtype=torch.float64)
        self.full = self.linear_full + self.fixed
        self.unit = torch.tensor([self._params(b, unit=True) for b in self.branches], dtype=torch.float64) + self.fixed
        self.useful = torch.maximum(remove_below * self.full, self.unit)
        self.total_params = sum(p.numel() for p in gated.model.parameters())
        # never pruned: patch embedding, tokens, final norm, head
        self.other_params = self.total_params - float((self.linear_full + self.norms).sum())
        self.budget_share = branch_budget_share(
            keep, float(self.full.sum()), self.other_params, scope, float(self.unit.min())
        )

    def _norm_params(self, i: int) -> int:
        blk = self.gated.model.blocks[i // 2]
        norm, ls = (blk.norm1, blk.ls1) if i % 2 == 0 else (blk.norm2, blk.ls2)
        return sum(p.numel() for m in (norm, ls) for p in m.parameters())

    def _bias(self, kind: str) -> tuple[bool, bool]:
        s = self.spec
        return (s.qkv_bias, s.proj_bias) if kind == "attn" else (s.fc1_bias, s.fc2_bias)

    def _params(self, branch, full: bool = False, unit: bool = False) -> int:
        """Kept Linear parameters; `full`: unpruned; `unit`: one head dim (of one head when heads are
        pruned, of every head otherwise) or one hidden unit, at full width."""
        s = self.spec
        w = branch.widths()
        if full or unit:
            inner = 1 if unit else (s.head_dim if w.kind == "attn" else s.mlp_hidden)
            heads = (1 if unit else s.num_heads) if "heads" in branch.gates() else None
            w = BranchWidths(w.kind, s.dim, inner, s.dim, heads)
        return int(branch_params(w, s.num_heads, *self._bias(w.kind)))

    def linear_kept(self) -> torch.Tensor:
        """Kept Linear parameters (mask ≥ 0.5) of every branch (what `--budget blocks` counts)."""
        return torch.tensor([self._params(b) for b in self.branches], dtype=torch.float64)

    def kept(self) -> torch.Tensor:
        """Kept cost of every branch: its Linear parameters, and its norm while it is not removed."""
        linear = self.linear_kept()
        return linear + self.fixed * (linear > 0)

    def kept_total(self) -> float:
        """Parameters the model keeps: kept Linear layers, the norms of branches not removed (under
        either budget scope), and everything never pruned."""
        linear = self.linear_kept()
        return float((linear + self.norms * (linear > 0)).sum()) + self.other_params

    def curve(self, i: int, order_gate: torch.Tensor) -> torch.Tensor:
        """Cost of branch `i` when keeping its top-k gate elements (`order_gate`: gate ids, best first)."""
        branch, s = self.branches[i], self.spec
        kind = branch.widths().kind
        full = {"in": s.dim, "out": s.dim, "head_dim": s.head_dim, "hidden": s.mlp_hidden, "heads": s.num_heads}
        linear = kept_cost_curve(order_gate, list(branch.gates()), kind, s.num_heads, self._bias(kind), full)
        return linear.double() + self.fixed[i] * (linear > 0)

    def grid(self, i: int) -> torch.Tensor:
        """Cost of attention branch `i` keeping h = 0..H heads of d = 0..head_dim dims, [H+1, d+1]."""
        s = self.spec
        h = torch.arange(s.num_heads + 1).unsqueeze(1)
        d = torch.arange(s.head_dim + 1).unsqueeze(0)
        linear = branch_params(BranchWidths("attn", s.dim, d, s.dim, h), s.num_heads, *self._bias("attn")).double()
        return linear + self.fixed[i] * (linear > 0)

    def log_fields(self) -> dict:
        return {}


class LatencyCosts:
    """Branch costs in predicted milliseconds, from a latency table (`p3bkit.latency.table`).

    Cost curves are non-decreasing, so the width chosen for a cost is the widest one at that cost:
    widths land at the right edge of the runtime's latency steps. Whole heads need a table measured
    over head counts (`p3bkit latency-table --heads all`).
    """

    def __init__(self, gated: GatedViT, table, target_ms: float, remove_below: float = 0.0) -> None:
        from p3bkit.latency.table import model_dims

        if table is None:
            raise P3BError("a latency budget needs a latency table (--latency-table, made by p3bkit latency-table)")
        if gated.structure not in ("inner", "heads"):
            raise P3BError(
                "latency budgets prune heads, head dims and MLP hidden units: use --structure inner or heads"
            )
        if gated.structure == "heads" and not table.has_head_axis:
            raise P3BError(
                "pruning whole heads for milliseconds needs a table over head counts: "
                "p3bkit latency-table MODEL --heads all"
            )
        table.check_model(model_dims(gated.spec))
        self.table, self.fixed_ms, self.target_ms = table, table.fixed_ms, target_ms
        self.asked_ms = target_ms  # what the user asked; `target_ms` may be corrected by speed checks (prune.speed)
        self.limit_ms: float | None = None  # the fastest any architecture at a parameter budget can be
        self.branches = [b for _, b in gated.branches()]
        self._grid = torch.from_numpy(table.attn_grid()) if gated.structure == "heads" else None
        self.curves = [
            None
            if "heads" in b.gates()
            else torch.from_numpy(table.branch_curve(b.widths().kind, b.gates()[_inner(b)].size))
            for b in self.branches
        ]
        self.full = torch.tensor(
            [float(c[-1]) if c is not None else float(self._heads_grid()[-1, -1]) for c in self.curves],
            dtype=torch.float64,
        )
        self.unit = torch.tensor(
            [float(c[1]) if c is not None else float(self._heads_grid()[1, 1]) for c in self.curves],
            dtype=torch.float64,
        )
        self.useful = torch.maximum(remove_below * self.full, self.unit)
        dense = self.fixed_ms + float(self.full.sum())
        if target_ms <= self.fixed_ms:
            raise P3BError(
                f"a target of {target_ms:.3f} ms is not above the {self.fixed_ms:.3f} ms the model takes on "
                f"{table.backend} with every block removed (patch embedding, norms, head)"
            )
        if target_ms >= dense:
            raise P3BError(
                f"a target of {target_ms:.3f} ms is not below the dense model's predicted {dense:.3f} ms "
                f"on {table.backend}: nothing to prune"
            )
        self.dense_ms = dense
        self.budget_share = (target_ms - self.fixed_ms) / float(self.full.sum())

    def _heads_grid(self) -> torch.Tensor:
        """ms of an attention branch keeping h heads of d dims, [H+1, d+1] (whole-head structure only)."""
        if self._grid is None:
            raise P3BError("a grid over head counts belongs to the whole-head structure (--structure heads)")
        return self._grid

    def retarget(self, target_ms: float, clamp: bool = True) -> float:
        """Allocate for `target_ms` from now on (a speed check's correction), kept between the
        branch-free model's time and the dense model's (`clamp`; a resumed run restores its target
        as it was); returns the target used."""
        if clamp:
            target_ms = min(max(target_ms, 1.01 * self.fixed_ms), self.dense_ms)
        self.target_ms = target_ms
        self.budget_share = (target_ms - self.fixed_ms) / float(self.full.sum())
        return target_ms

    def options(self, i: int, params: ParameterCosts) -> tuple[torch.Tensor, torch.Tensor]:
        """(parameters, predicted ms) of every width branch `i` can be pruned to, removal included."""
        curve = self.curves[i]
        if curve is None:
            return params.grid(i).flatten(), self._heads_grid().flatten()
        gates = list(self.branches[i].gates())
        n = self.branches[i].gates()[_inner(self.branches[i])].size
        order_gate = torch.full((n,), gates.index(_inner(self.branches[i])))
        return params.curve(i, order_gate), curve

    def fastest_at(self, params: ParameterCosts, kept_params: float) -> float:
        """A lower bound on the predicted ms of any architecture keeping `kept_params` branch
        parameters (as `params` counts them), whatever the importance: the convex relaxation of
        choosing one width per branch, solved by its Lagrangian (λ prices a parameter in ms)."""
        options = [self.options(i, params) for i in range(len(self.branches))]

        def pick(lam: float) -> tuple[float, float]:
            p = ms = 0.0
            for cost, time in options:
                j = int(torch.argmax(lam * cost - time - 1e-12 * cost))  # ties: the fewer parameters
                p, ms = p + float(cost[j]), ms + float(time[j])
            return p, ms

        top = pick(1e9)
        if top[0] < kept_params:
            return float("inf")
        lo, hi = 0.0, 1.0
        while pick(hi)[0] < kept_params:
            hi *= 2
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if pick(mid)[0] < kept_params else (lo, mid)
        (p0, t0), (p1, t1) = pick(lo), pick(hi)
        frac = 0.0 if p1 <= p0 else (kept_params - p0) / (p1 - p0)
        return self.fixed_ms + t0 + min(max(frac, 0.0), 1.0) * (t1 - t0)

    def check_parameter_budget(self, params: ParameterCosts) -> None:
        """Refuse a latency target no architecture of the budget's size is predicted to meet (it could
        only be met by pruning far past the size asked for)."""
        ceiling = params.budget_share * float(params.full.sum())
        self.limit_ms = self.fastest_at(params, ceiling)
        if self.limit_ms > self.target_ms:
            size = (
                f"keeping {100 * (ceiling + params.other_params) / params.total_params:.1f}% of the parameters"
                if params.scope == "total"
                else f"keeping {100 * params.budget_share:.1f}% of the block parameters"
            )
            raise P3BError(
                f"the parameter budget and the latency target conflict: {size}, "
                f"no architecture is predicted faster than {self.limit_ms:.3f} ms "
                f"({self.table.dense_ms / self.limit_ms:.2f}× on {self.table.backend}), above the "
                f"{self.target_ms:.3f} ms target: keep fewer parameters or ask for less speed"
            )

    def kept(self) -> torch.Tensor:
        """Predicted ms of every branch at its current kept width (mask ≥ 0.5)."""
        out = []
        for c, b in zip(self.curves, self.branches):
            gates = b.gates()
            out.append(
                float(c[gates[_inner(b)].kept()])
                if c is not None
                else float(self._heads_grid()[gates["heads"].kept(), gates["head_dim"].kept()])
            )
        return torch.tensor(out, dtype=torch.float64)

    def curve(self, i: int, order_gate: torch.Tensor) -> torch.Tensor:
        curve = self.curves[i]
        if curve is None:
            counts = _counts(order_gate, list(self.branches[i].gates()))
            return torch.cummax(self._heads_grid()[counts[:, 0], counts[:, 1]], 0).values
        return curve

    def grid(self, i: int) -> torch.Tensor:
        return self._heads_grid()

    def log_fields(self) -> dict:
        return {"predicted_ms": self.fixed_ms + float(self.kept().sum())}

    def report(self, layers: list[dict]) -> dict:
        """Target and prediction for a pruned architecture, for summary.json."""
        t = self.table
        predicted = t.predict(layers)
        limit = self.limit_ms
        return {
            **(
                {"fastest_at_parameter_budget_ms": limit, "fastest_at_parameter_budget_speedup": t.dense_ms / limit}
                if limit is not None
                else {}
            ),
            "backend": t.backend,
            "device": t.device,
            "batch": t.batch,
            "threads": t.threads,
            "cpu": t.machine.get("cpu"),
            "target_ms": self.asked_ms,
            "predicted_ms": predicted,
            "dense_ms_measured": t.dense_ms,
            "predicted_speedup": t.dense_ms / predicted,
            "target_speedup": t.dense_ms / self.asked_ms,
            **({"target_ms_used": self.target_ms} if self.target_ms != self.asked_ms else {}),
            "table_check_error": t.check_error,
        }


def _inner(branch) -> str:
    """The inner gate of an `inner`/`heads` branch: head dims or hidden units."""
    return "head_dim" if "head_dim" in branch.gates() else "hidden"
