"""The P3B engine: one training step, mask updates, allocation (paper §3, Appendix A–C).

`P3BPruner` owns the gated model, the BPI, the optimizer and the accumulators between mask
updates. Every `update_every` steps (after warm-up) it turns the accumulated ΔΨ into block keep
ratios and the accumulated Taylor scores into new soft masks. Masks are buffers: AdamW never
sees them (the upstream code let the optimizer drift them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from p3bkit.models.cost import block_params
from p3bkit.models.gates import GatedAttention, GatedViT
from p3bkit.prune.bpi import BPI, ClassHead, Criterion, StateRecorder, ce_loss
from p3bkit.models.latency import LatencyTable
from p3bkit.prune.budget import ImportanceEMA, LatencyBudget, allocate_keep_ratios, block_importance, block_keep_ratio, ramp
from p3bkit.prune.masks import GATE_FACTORS, kept_cost_curve, normalised_ranks, soft_mask_values, threshold_count
from p3bkit.prune.schedule import Schedule

Allocation = Literal["p3b", "uniform", "global-magnitude"]
BudgetScope = Literal["total", "blocks"]
EmptyBlocks = Literal["disable", "regrow"]


@dataclass
class P3BConfig:
    """Pruning hyper-parameters; defaults are the paper's Table 5 (epochs set by the trainer)."""

    keep: float = 0.5
    budget: BudgetScope = "total"  # keep is a fraction of all parameters (the paper's), or of block parameters
    update_every: int = 1000
    alpha: float = 0.5
    tau: float = 0.1
    m_ref: float = 0.9
    smoothing: float = 10.0
    ema_momentum: float = 0.2
    lr_model: float = 5e-4
    lr_bpi: float = 5e-4
    weight_decay: float = 0.05
    frozen: bool = False  # Appendix G: model lr 1e-8, so Taylor scores still get gradients
    empty_blocks: EmptyBlocks = "disable"  # an emptied block stays empty, or may regrow (budget.py)
    bpi_class_head: ClassHead = "linear"  # the paper's Linear, or LayerNorm + Linear
    allocation: Allocation = "p3b"
    keep_ratios: list[float] | None = None  # handcrafted per-block κ (ablations)
    target_ms: float | None = None  # latency budget (needs a LatencyTable; `keep` is then unused)
    gate_factors: dict[str, float] = field(default_factory=lambda: dict(GATE_FACTORS))


class P3BPruner(nn.Module):
    """Trains a gated ViT while pruning it with P3B."""

    def __init__(self, gated: GatedViT, cfg: P3BConfig, schedule: Schedule, criterion: Criterion = ce_loss,
                 lr_scale: float = 1.0, latency_table: LatencyTable | None = None) -> None:
        """`lr_scale` multiplies both learning rates (the DeiT rule: batch size / 512).

        With `cfg.target_ms` and a `latency_table`, every block's cost is its predicted milliseconds
        on the table's runtime instead of its parameter count: importance per ms, κ solved so
        that the predicted model time meets the target, kept widths chosen on the table's curve.
        """
        super().__init__()
        self.gated, self.cfg, self.schedule, self.criterion = gated, cfg, schedule, criterion
        self.bpi = BPI.for_model(gated.model, cfg.bpi_class_head)
        self.branches = [b for _, b in gated.branches()]
        self.full_sizes = torch.tensor([self._params(b, full=True) for b in self.branches], dtype=torch.float64)
        self.unit_costs = torch.tensor([self._params(b, unit=True) for b in self.branches], dtype=torch.float64)
        self.total_params = sum(p.numel() for p in gated.model.parameters())
        self.other_params = self.total_params - float(self.full_sizes.sum())
        self.block_keep = block_keep_ratio(cfg.keep, float(self.full_sizes.sum()), self.other_params, cfg.budget)
        self.latency = LatencyBudget(gated, self.branches, latency_table, cfg.target_ms) if cfg.target_ms else None
        if self.latency is not None:
            self.block_keep = self.latency.block_keep
        self.alloc_full = self.latency.full if self.latency else self.full_sizes
        self.alloc_unit = self.latency.unit if self.latency else self.unit_costs
        n = len(self.branches)
        self.register_buffer("delta_c", torch.zeros(n))
        self.register_buffer("delta_p", torch.zeros(n))
        self.register_buffer("delta_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("kappa", torch.ones(n))
        self.register_buffer("disabled", torch.zeros(n, dtype=torch.bool))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.ema = ImportanceEMA(cfg.ema_momentum)
        self.optimizer = torch.optim.AdamW(self._param_groups(lr_scale))
        for gate in gated.gates.values():
            gate.track = True
        self._fwd = {"model": gated, "bpi": self.bpi}  # DDP wrappers under torchrun (not submodules)

    def _param_groups(self, lr_scale: float) -> list[dict]:
        """Model (decay on weights only, timm's rule) and BPI groups; the frozen ablation uses lr 1e-8."""
        from timm.optim import param_groups_weight_decay

        model = self.gated.model
        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
        lr_model = 1e-8 if self.cfg.frozen else self.cfg.lr_model * lr_scale
        groups = [dict(g, lr=lr_model) for g in param_groups_weight_decay(model, self.cfg.weight_decay, no_weight_decay_list=skip)]
        return groups + [{"params": list(self.bpi.parameters()), "lr": self.cfg.lr_bpi * lr_scale, "weight_decay": 0.0}]

    def set_forward(self, model: nn.Module, bpi: nn.Module) -> None:
        """Run the model and BPI forward through these (e.g. DistributedDataParallel) wrappers."""
        self._fwd = {"model": model, "bpi": bpi}

    def _params(self, branch: nn.Module, full: bool = False, unit: bool = False) -> int:
        """Kept block parameters; `full`: unpruned; `unit`: one head dim / hidden unit at full width."""
        s = self.gated.spec
        w = branch.widths()
        if full or unit:
            inner = 1 if unit else (s.head_dim if w.kind == "attn" else s.mlp_hidden)
            w = type(w)(w.kind, s.dim, inner, s.dim)
        bias = (s.qkv_bias, s.proj_bias) if w.kind == "attn" else (s.fc1_bias, s.fc2_bias)
        return int(block_params(w, s.num_heads, *bias))

    def kept_sizes(self) -> torch.Tensor:
        return torch.tensor([self._params(b) for b in self.branches], dtype=torch.float64)

    def kept_costs(self) -> torch.Tensor:
        """What the allocation counts per block now: parameters, or predicted ms under a latency budget."""
        return self.latency.kept(self.branches) if self.latency else self.kept_sizes()

    def train_step(self, x: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None = None,
                   autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
        """Forward, backward (model + BPI), optimizer step; accumulates ΔΨ and Taylor scores.

        `y` is class indices or, with Mixup/CutMix, soft targets (B, K); the losses take both.
        Accumulation restarts when warm-up ends, so the first mask update averages pruning-time
        steps only (the BPI heads are still untrained during warm-up).
        """
        recorder = StateRecorder(self.gated.model)
        try:
            with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = self._fwd["model"](x)
                cls, dist = (out if isinstance(out, tuple) else (out, None))
                loss = self.criterion(cls, dist, y, teacher)
                bpi_loss, d_c, d_p = self._fwd["bpi"](recorder.take(), y, self.criterion, teacher)
        finally:
            recorder.remove()
        self.optimizer.zero_grad(set_to_none=True)
        (loss + bpi_loss).backward()
        self.optimizer.step()
        self.delta_c += d_c.float()
        self.delta_p += d_p.float()
        self.delta_count += 1
        self.step += 1
        if int(self.step) == self.schedule.warmup_steps:
            self.reset_accumulators()
        labels = y.argmax(-1) if y.dim() == 2 else y
        correct = (cls.argmax(-1) == labels).float().mean()
        return {"loss": loss.item(), "bpi_loss": bpi_loss.item(), "acc": correct.item(), "soft_targets": y.dim() == 2}

    def reset_accumulators(self) -> None:
        """Forget ΔΨ and Taylor scores accumulated so far."""
        self.delta_c.zero_(), self.delta_p.zero_(), self.delta_count.zero_()
        for gate in self.gated.gates.values():
            gate.reset_scores()

    def due(self) -> bool:
        """A mask update is due after this step (never during warm-up; always on the last step)."""
        step = int(self.step)
        phase, _, _ = self.schedule.at(step - 1)
        last = step == self.schedule.total
        return phase != "warmup" and (step % self.cfg.update_every == 0 or last)

    def target_keep_ratios(self) -> torch.Tensor:
        sizes, disabled = self.alloc_full, self.disabled.cpu()
        if self.cfg.keep_ratios is not None:
            return torch.tensor(self.cfg.keep_ratios, dtype=torch.float32)
        if self.cfg.allocation == "uniform":
            return allocate_keep_ratios(torch.ones(len(sizes)), sizes, self.block_keep, disabled)
        if self.cfg.allocation == "global-magnitude":
            return self._global_magnitude_ratios()
        count = self.delta_count.clamp(min=1)
        imp = block_importance((self.delta_c / count).cpu(), (self.delta_p / count).cpu(), self.kept_costs(),
                               self.cfg.alpha, self.cfg.smoothing, self.alloc_unit, ~disabled)
        return allocate_keep_ratios(self.ema.update(imp.double()), sizes, self.block_keep, disabled)

    @torch.no_grad()
    def update_masks(self) -> dict:
        """Recompute κ and all soft masks from the accumulators, then reset them."""
        phase, progress, tau = self.schedule.at(int(self.step) - 1)
        tau = 0.0 if int(self.step) >= self.schedule.total else tau
        if self.cfg.keep_ratios is None:
            self._disable_empty_blocks()
        target = self.target_keep_ratios()
        disabled = self.disabled.cpu() if self.cfg.keep_ratios is None else None
        self.kappa.copy_(ramp(target, progress, disabled))
        carry = 0.0  # rounding to whole units is carried to the next block, so the sum meets the budget
        for branch, kappa in zip(self.branches, self.kappa.tolist()):
            carry = self._update_branch(branch, kappa, tau, carry if kappa > 0 else 0.0)
        count = self.delta_count.clamp(min=1)
        record = {"step": int(self.step), "phase": phase, "tau": tau,
                  "delta_c": (self.delta_c / count).tolist(), "delta_p": (self.delta_p / count).tolist(),
                  "kappa_target": target.tolist(), "kappa": self.kappa.tolist(), "disabled": self.disabled.tolist(),
                  "kept_params": self.kept_sizes().tolist(), "full_params": self.full_sizes.tolist()}
        if self.latency:
            record["predicted_ms"] = self.latency.fixed_ms + float(self.kept_costs().sum())
        self.reset_accumulators()
        return record

    def _disable_empty_blocks(self) -> None:
        """Take emptied blocks out of the allocation for good (budget.py says why).

        A dead block (some gate exactly 0 everywhere) has measured nothing since the last update:
        no ΔΨ, no Taylor scores, no gradients; regrowing it would pick units by index order, so it
        is disabled under either policy. With `empty_blocks="disable"` a block whose masks keep no
        element (all < 0.5) is disabled too, although its soft tail still passes a little signal.
        """
        for i, branch in enumerate(self.branches):
            gates = branch.gates().values()
            dead = any(not bool((g.mask > 0).any()) for g in gates)
            empty = branch.widths().empty
            if dead or (empty and self.cfg.empty_blocks == "disable"):
                self.disabled[i] = True

    def _local_scores(self, branch: nn.Module) -> torch.Tensor:
        """I_cat: Taylor ranks × gate factors (P3B), or raw mean-square magnitudes (global-magnitude)."""
        gates = branch.gates()
        if self.cfg.allocation == "global-magnitude":
            mags = branch.magnitudes(mean=True)
            return torch.cat([mags[k].float().cpu() for k in gates])
        return torch.cat([normalised_ranks(g.scores(), g.tiebreak()) * self.cfg.gate_factors[k]
                          for k, g in gates.items()])

    def _cost_curve(self, branch: nn.Module, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(descending order of `scores`, block parameters when keeping the top-k, k = 0..n)."""
        gates = branch.gates()
        gate_id = torch.cat([torch.full((g.size,), i) for i, g in enumerate(gates.values())])
        order = torch.argsort(scores, descending=True, stable=True)
        if self.latency:
            return order, self.latency.curves[self.branches.index(branch)]
        s = self.gated.spec
        kind = "attn" if isinstance(branch, GatedAttention) else "mlp"
        full = {"in": s.dim, "out": s.dim, "head_dim": s.head_dim, "hidden": s.mlp_hidden}
        bias = (s.qkv_bias, s.proj_bias) if kind == "attn" else (s.fc1_bias, s.fc2_bias)
        return order, kept_cost_curve(gate_id[order], list(gates), kind, s.num_heads, bias, full)

    def _global_magnitude_ratios(self) -> torch.Tensor:
        """One threshold θ on mean-square weight magnitude across all blocks, meeting the budget."""
        curves = []
        for b in self.branches:
            scores = self._local_scores(b)
            order, cost = self._cost_curve(b, scores)
            curves.append((scores[order], cost))
        everything = torch.sort(torch.cat([c[0] for c in curves]), descending=True).values
        budget = self.block_keep * float(self.alloc_full.sum())

        def kept_cost(theta: float) -> list[float]:
            return [float(cost[int((sc >= theta).sum())]) for sc, cost in curves]

        lo, hi = 0, len(everything) - 1  # find the largest index whose threshold stays within budget
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if sum(kept_cost(float(everything[mid]))) <= budget else (lo, mid - 1)
        costs = torch.tensor(kept_cost(float(everything[lo])), dtype=torch.float64)
        return (costs / self.alloc_full).float()

    def _update_branch(self, branch: nn.Module, kappa: float, tau: float, carry: float = 0.0) -> float:
        """New soft masks for κ·|W| (+ `carry`) kept parameters; returns the shortfall to carry on."""
        gates = branch.gates()
        scores = self._local_scores(branch)
        order, cost = self._cost_curve(branch, scores)
        n = scores.numel()
        target = kappa * float(cost[-1]) + carry
        keep_count = threshold_count(cost, target)
        values = torch.empty(n)
        values[order.flip(0)] = soft_mask_values(n, n - keep_count, tau, self.cfg.m_ref)
        for gate, part in zip(gates.values(), values.split([g.size for g in gates.values()])):
            gate.mask.copy_(part.to(gate.mask.device))
        return target - float(cost[keep_count])

    def block_keep_ratio(self) -> float:
        """Kept block parameters (mask ≥ 0.5) over all block parameters."""
        return float(self.kept_sizes().sum() / self.full_sizes.sum())

    def total_keep_ratio(self) -> float:
        """Kept parameters of the whole model (unprunable ones included) over all its parameters."""
        return float((self.kept_sizes().sum() + self.other_params) / self.total_params)

    def extra_state(self) -> dict:
        return {"ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
