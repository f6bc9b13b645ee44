"""Cost models: what the allocation counts per branch — parameters (the paper's) or predicted ms.

P3B's allocation divides block importance by a branch's kept cost and solves the keep ratios κ
against a budget of total cost. `ParameterCosts` counts the branch's Linear parameters (|wᵢ|,
Appendix A) and turns a budget over all parameters into one over branch parameters; the
parameters P3B never prunes (patch embedding, tokens, norms, head) count against it.
`LatencyCosts` counts the branch's predicted milliseconds on a latency table's runtime:
importance per ms, κ as a fraction of the branch's full-width time, the budget (target − the
branch-free model's time) / Σ full-width branch times. Both give, for a branch and an order of its
gate elements, the cost of keeping the top k for every k (`curve`), which the soft masks use to
find their threshold.
"""
from __future__ import annotations

import torch

from p3bkit.errors import P3BError
from p3bkit.models.cost import BranchWidths, branch_params
from p3bkit.models.gates import GatedViT


def block_keep_ratio(keep: float, block_params: float, other_params: float, scope: str) -> float:
    """The fraction of branch parameters to keep so that `keep` holds for the chosen scope.

    scope "total": keep·(branches + other) − other over branches (the paper's definition, where the
    unprunable parameters count against the budget); "blocks": `keep` itself.

    Raises:
        P3BError: when the unprunable parameters alone exceed the total budget.
    """
    if scope == "blocks":
        return keep
    if scope != "total":
        raise P3BError(f"budget scope must be 'total' or 'blocks', got {scope!r}")
    ratio = (keep * (block_params + other_params) - other_params) / block_params
    if ratio <= 0:
        raise P3BError(f"keeping {100 * keep:.1f}% of all {block_params + other_params:,.0f} parameters leaves nothing "
                       f"for the blocks: {other_params:,.0f} parameters (patch embedding, tokens, norms, head) are "
                       f"never pruned; raise --keep or use --budget blocks")
    return min(ratio, 1.0)


def kept_cost_curve(order_gate: torch.Tensor, names: list[str], kind: str,
                    num_heads: int, bias: tuple[bool, bool], full: dict[str, int]) -> torch.Tensor:
    """Branch parameters when keeping the top-k elements, for every k = 0..n (vectorised).

    `order_gate[p]` is the gate id (index into `names`) of the p-th most important element.
    Gates absent from `names` (not pruned) stay at their `full` width.
    """
    n = order_gate.numel()
    counts = torch.zeros(n + 1, len(names), dtype=torch.long)
    counts[1:] = torch.nn.functional.one_hot(order_gate, len(names)).cumsum(0)
    inner_key = "head_dim" if kind == "attn" else "hidden"
    col = {name: counts[:, names.index(name)] if name in names else torch.full((n + 1,), full[name]) for name in full}
    return branch_params(BranchWidths(kind, col["in"], col[inner_key], col["out"]), num_heads, *bias).long()


class ParameterCosts:
    """Branch costs in parameters; `block_keep` is the fraction of branch parameters to keep."""

    def __init__(self, gated: GatedViT, keep: float, scope: str) -> None:
        self.gated, self.spec = gated, gated.spec
        self.branches = [b for _, b in gated.branches()]
        self.full = torch.tensor([self._params(b, full=True) for b in self.branches], dtype=torch.float64)
        self.unit = torch.tensor([self._params(b, unit=True) for b in self.branches], dtype=torch.float64)
        self.total_params = sum(p.numel() for p in gated.model.parameters())
        self.other_params = self.total_params - float(self.full.sum())
        self.block_keep = block_keep_ratio(keep, float(self.full.sum()), self.other_params, scope)

    def _bias(self, kind: str) -> tuple[bool, bool]:
        s = self.spec
        return (s.qkv_bias, s.proj_bias) if kind == "attn" else (s.fc1_bias, s.fc2_bias)

    def _params(self, branch, full: bool = False, unit: bool = False) -> int:
        """Kept branch parameters; `full`: unpruned; `unit`: one head dim / hidden unit at full width."""
        s = self.spec
        w = branch.widths()
        if full or unit:
            inner = 1 if unit else (s.head_dim if w.kind == "attn" else s.mlp_hidden)
            w = BranchWidths(w.kind, s.dim, inner, s.dim)
        return int(branch_params(w, s.num_heads, *self._bias(w.kind)))

    def kept(self) -> torch.Tensor:
        """Kept parameters (mask ≥ 0.5) of every branch."""
        return torch.tensor([self._params(b) for b in self.branches], dtype=torch.float64)

    def curve(self, i: int, order_gate: torch.Tensor) -> torch.Tensor:
        """Parameters of branch `i` when keeping its top-k gate elements (`order_gate`: gate ids, best first)."""
        branch, s = self.branches[i], self.spec
        kind = "attn" if branch.widths().kind == "attn" else "mlp"
        full = {"in": s.dim, "out": s.dim, "head_dim": s.head_dim, "hidden": s.mlp_hidden}
        return kept_cost_curve(order_gate, list(branch.gates()), kind, s.num_heads, self._bias(kind), full)

    def log_fields(self) -> dict:
        return {}


class LatencyCosts:
    """Branch costs in predicted milliseconds, from a latency table (`p3bkit.latency.table`).

    Each branch's cost curve over kept units is non-decreasing, so the width chosen for a cost is
    the widest one at that cost: widths land at the right edge of the runtime's latency steps.
    """

    def __init__(self, gated: GatedViT, table, target_ms: float) -> None:
        from p3bkit.latency.table import model_dims

        if table is None:
            raise P3BError("a latency budget needs a latency table (--latency-table, made by p3bkit latency-table)")
        if gated.structure != "inner":
            raise P3BError("latency budgets prune head dims and MLP hidden units: use --structure inner")
        table.check_model(model_dims(gated.spec))
        self.table, self.fixed_ms, self.target_ms = table, table.fixed_ms, target_ms
        self.branches = [b for _, b in gated.branches()]
        self.curves = [torch.from_numpy(table.branch_curve(b.widths().kind, _only_gate(b).size)) for b in self.branches]
        self.full = torch.stack([c[-1] for c in self.curves]).double()
        self.unit = torch.stack([c[1] for c in self.curves]).double()
        dense = self.fixed_ms + float(self.full.sum())
        if target_ms <= self.fixed_ms:
            raise P3BError(f"a target of {target_ms:.3f} ms is not above the {self.fixed_ms:.3f} ms the model takes on "
                           f"{table.backend} with every block removed (patch embedding, norms, head)")
        if target_ms >= dense:
            raise P3BError(f"a target of {target_ms:.3f} ms is not below the dense model's predicted {dense:.3f} ms "
                           f"on {table.backend}: nothing to prune")
        self.dense_ms = dense
        self.block_keep = (target_ms - self.fixed_ms) / float(self.full.sum())

    def kept(self) -> torch.Tensor:
        """Predicted ms of every branch at its current kept width (mask ≥ 0.5)."""
        return torch.stack([c[_only_gate(b).kept()] for c, b in zip(self.curves, self.branches)]).double()

    def curve(self, i: int, order_gate: torch.Tensor) -> torch.Tensor:
        return self.curves[i]

    def log_fields(self) -> dict:
        return {"predicted_ms": self.fixed_ms + float(self.kept().sum())}

    def report(self, layers: list[dict]) -> dict:
        """Target and prediction for a pruned architecture, for summary.json."""
        t = self.table
        predicted = t.predict(layers)
        return {"backend": t.backend, "device": t.device, "batch": t.batch, "threads": t.threads, "cpu": t.machine.get("cpu"),
                "target_ms": self.target_ms, "predicted_ms": predicted, "dense_ms_measured": t.dense_ms,
                "predicted_speedup": t.dense_ms / predicted, "target_speedup": t.dense_ms / self.target_ms}


def _only_gate(branch):
    (gate,) = branch.gates().values()  # structure "inner": one gate per branch (head dims or hidden units)
    return gate
