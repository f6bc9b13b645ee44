"""The P3B pruner: one training step, mask updates, in order (paper §3, Appendix A–C).

`P3BPruner` owns the gated model, the BPI, the optimizer and the accumulators between mask
updates; what it allocates is an `Allocation` (`prune.allocation`: the paper's, uniform, global
magnitude, fixed) over a cost model (`prune.costs`: parameters, or predicted ms). Every
`update_every` steps after warm-up it turns the accumulated ΔΨ into branch keep ratios and the
accumulated Taylor scores into new soft masks. Masks are buffers: AdamW never sees them.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn as nn

from p3bkit.errors import P3BError
from p3bkit.models.gates import GatedViT
from p3bkit.prune.allocation import Allocation, AllocationInput, make_allocation, ramp
from p3bkit.prune.bpi import BPI, Criterion, StateRecorder, ce_loss, indicator_images
from p3bkit.prune.config import P3BConfig
from p3bkit.prune.costs import LatencyCosts, ParameterCosts
from p3bkit.prune.masks import soft_mask_values, threshold_count
from p3bkit.prune.schedule import Schedule


class SoftTargets(NamedTuple):
    """A dense teacher's logits for this batch, and the distillation term's weight w and temperature T."""

    logits: torch.Tensor
    weight: float
    temperature: float


class P3BPruner(nn.Module):
    """Trains a gated ViT while pruning it with P3B."""

    delta_c: torch.Tensor  # buffers (registered in __init__)
    delta_p: torch.Tensor
    delta_count: torch.Tensor
    kappa: torch.Tensor
    disabled: torch.Tensor
    step: torch.Tensor

    def __init__(
        self,
        gated: GatedViT,
        cfg: P3BConfig,
        schedule: Schedule,
        criterion: Criterion = ce_loss,
        lr_scale: float = 1.0,
        latency_table=None,
    ) -> None:
        """`lr_scale` multiplies both learning rates (the DeiT rule: batch size / 512).

        With `cfg.target_ms` and a `latency_table`, every branch's cost is its predicted milliseconds
        on the table's runtime instead of its parameter count; with `cfg.keep_too` the parameter
        budget `cfg.keep` holds as well (`_targets_within_params`), and a latency target that no
        architecture of that size is predicted to meet is refused up front.
        """
        super().__init__()
        self.gated, self.cfg, self.schedule, self.criterion = gated, cfg, schedule, criterion
        self.bpi = BPI.for_model(gated.model, cfg.bpi_class_head)
        self.branches = [b for _, b in gated.branches()]
        self.params = ParameterCosts(gated, cfg.keep, cfg.budget, cfg.remove_below)
        latency = LatencyCosts(gated, latency_table, cfg.target_ms, cfg.remove_below) if cfg.target_ms else None
        self.costs: LatencyCosts | ParameterCosts = latency if latency is not None else self.params
        # a latency target with a parameter budget (`_targets_within_params`)
        self.both_budgets = latency is not None and cfg.keep_too
        self.bound: str | None = None  # which of the two bound the last update: "latency" or "parameters"
        if latency is not None and self.both_budgets:
            if cfg.keep_ratios is not None:
                raise P3BError(
                    "handcrafted keep ratios take no budget: drop the parameter budget or the latency target"
                )
            latency.check_parameter_budget(self.params)
        self.allocation: Allocation = make_allocation(cfg)
        n = len(self.branches)
        self.register_buffer("delta_c", torch.zeros(n))
        self.register_buffer("delta_p", torch.zeros(n))
        self.register_buffer("delta_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("kappa", torch.ones(n))
        self.register_buffer("disabled", torch.zeros(n, dtype=torch.bool))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.optimizer = torch.optim.AdamW(
            self._param_groups(lr_scale), foreach=True
        )  # one op per group, not per tensor
        for name, gate in gated.gates.items():
            gate.track = True
            if name.endswith(".heads"):
                gate.score_floor = cfg.head_score_floor
        self._fwd = {"model": gated, "bpi": self.bpi}  # DDP wrappers under torchrun (not submodules)

    @property
    def budget_share(self) -> float:
        """The fraction of total branch cost (parameters or predicted ms) the allocation keeps."""
        return self.costs.budget_share

    def _param_groups(self, lr_scale: float) -> list[dict]:
        """Model (decay on weights only, timm's rule) and BPI groups; the frozen ablation uses lr 1e-8."""
        from timm.optim import param_groups_weight_decay

        model = self.gated.model
        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
        lr_model = 1e-8 if self.cfg.frozen else self.cfg.lr_model * lr_scale
        groups = [
            dict(g, lr=lr_model)
            for g in param_groups_weight_decay(model, self.cfg.weight_decay, no_weight_decay_list=skip)
        ]
        return groups + [{"params": list(self.bpi.parameters()), "lr": self.cfg.lr_bpi * lr_scale, "weight_decay": 0.0}]

    def set_forward(self, model: nn.Module, bpi: nn.Module) -> None:
        """Run the model and BPI forward through these (e.g. DistributedDataParallel) wrappers."""
        self._fwd = {"model": model, "bpi": bpi}

    # ---- training ------------------------------------------------------------------------------

    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        teacher: torch.Tensor | None = None,
        autocast_dtype: torch.dtype | None = None,
        soft: SoftTargets | None = None,
    ) -> dict[str, float]:
        """Forward, backward (model + BPI), optimizer step; accumulates ΔΨ and Taylor scores.

        `y` is class indices or, with Mixup/CutMix, soft targets (B, K); the losses take both.
        `teacher`: the hard-distillation labels of a DeiT distillation token; `soft`: a dense
        teacher's logits, distilled into the model's loss (`train.fit.distillation_loss`) — the
        indicators keep the labels alone: ΔΨ measures class discrimination, not agreement.
        Accumulation restarts when warm-up ends, so the first mask update averages pruning-time
        steps only (the BPI heads are still untrained during warm-up). The indicators see the
        first `cfg.bpi_fraction` of the (shuffled) batch: their patch heads, a ResNet block over the
        token grid before and after every branch, cost several times the model's own forward.
        """
        recorder = StateRecorder(self.gated.model)
        try:
            with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = self._fwd["model"](x)
                cls, dist = out if isinstance(out, tuple) else (out, None)
                loss = self.criterion(cls, dist, y, teacher)
                if soft is not None:
                    from p3bkit.train.fit import distillation_loss

                    loss = distillation_loss(cls, soft.logits, loss, soft.weight, soft.temperature)
                m = indicator_images(len(x), self.cfg.bpi_fraction)  # the batch is shuffled: its first m images
                states = [s[:m] for s in recorder.take()]
                bpi_loss, d_c, d_p = self._fwd["bpi"](
                    states, y[:m], self.criterion, None if teacher is None else teacher[:m]
                )
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

    def accumulators(self) -> list[torch.Tensor]:
        """Every tensor summed between mask updates (ΔΨ and Taylor scores): what DDP all-reduces."""
        tensors = [self.delta_c, self.delta_p, self.delta_count]
        for g in self.gated.gates.values():
            tensors += [g.score_sum, g.grad_sum, g.score_count]
        return tensors

    def reset_accumulators(self) -> None:
        """Forget ΔΨ and Taylor scores accumulated so far."""
        self.delta_c.zero_(), self.delta_p.zero_(), self.delta_count.zero_()
        for gate in self.gated.gates.values():
            gate.reset_scores()

    def due(self) -> bool:
        """A mask update is due after this step: every `update_every` steps counted from the end of
        warm-up (so every window is whole), and on the last step."""
        step = int(self.step)
        since = step - self.schedule.warmup_steps
        return since > 0 and (since % self.cfg.update_every == 0 or step == self.schedule.total)

    # ---- mask updates --------------------------------------------------------------------------

    def _order(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(local scores, their descending order, cost of keeping the top k) of branch `i`."""
        gates = self.branches[i].gates()
        scores = self.allocation.local_scores(self.branches[i])
        gate_id = torch.cat([torch.full((g.size,), j) for j, g in enumerate(gates.values())])
        order = torch.argsort(scores, descending=True, stable=True)
        return scores, order, self.costs.curve(i, gate_id[order])

    def allocation_input(self, removals_open: bool = True, budget: float | None = None) -> AllocationInput:
        """What the allocation decides from; `removals_open` while sparsify runs; `budget`: the share
        of the full branch cost to keep (default: the cost model's)."""
        count = self.delta_count.clamp(min=1)

        def curves():
            return [(scores[order], cost) for scores, order, cost in map(self._order, range(len(self.branches)))]

        return AllocationInput(
            (self.delta_c / count).cpu(),
            (self.delta_p / count).cpu(),
            self.costs.kept(),
            self.costs.full,
            self.costs.unit,
            self.disabled.cpu(),
            self.budget_share if budget is None else budget,
            curves,
            self.costs.useful,
            int(self.delta_count) >= self.cfg.update_every,
            removals_open,
        )

    @torch.no_grad()
    def record_measurements(
        self, delta_c: torch.Tensor, delta_p: torch.Tensor, scores: dict[str, torch.Tensor]
    ) -> None:
        """Measurements from outside the training loop (latency checks, tests): one step's ΔΨ per
        branch and Taylor scores per gate (`scores`, keyed like `gated.gates`), which stand for the
        squared mask gradients too (what a gate with a score floor ranks by)."""
        self.delta_c += delta_c.to(self.delta_c)
        self.delta_p += delta_p.to(self.delta_p)
        self.delta_count += 1
        for name, gate in self.gated.gates.items():
            gate.record(scores[name].to(gate.score_sum), scores[name].to(gate.grad_sum))

    @torch.no_grad()
    def update_masks(self, step: int | None = None, plan: bool = False) -> dict:
        """Recompute κ and all soft masks from the accumulators, then reset them.

        `step`: the schedule position the update is for (default: after the current training step);
        `schedule.total` gives the final, hard masks at the targets. `plan`: the record also holds
        the architecture the targets lead to (`planned_layers`), for a speed check.
        """
        step = int(self.step) if step is None else step
        phase, progress, tau = self.schedule.at(step - 1)
        tau = 0.0 if step >= self.schedule.total else tau
        disables = self.allocation.disables_empty
        if disables:
            self._disable_empty_branches()
        # removals stay open while the ramp runs (a decision at its last update, κ jumping to 0 with no
        # window left to undo it, would not be reversible)
        open_ = phase in ("warmup", "sparsify") and progress < 1 and step < self.schedule.total
        cache: dict = {}
        if self.both_budgets:
            target, self.bound = self._targets_within_params(open_, cache)
        else:
            target = self.allocation.targets(self.allocation_input(open_))
        self.kappa.copy_(ramp(target, progress, self.disabled.cpu() if disables else None))
        carry = 0.0  # rounding to whole units is carried on, through removed branches, so the sum meets the budget
        for i, kappa in enumerate(self.kappa.tolist()):
            widths, carry = self._choose(i, kappa, carry, cache)
            self._write(i, widths, tau)
        count = self.delta_count.clamp(min=1)
        record = {
            "step": step,
            "phase": phase,
            "tau": tau,
            "delta_c": (self.delta_c / count).tolist(),
            "delta_p": (self.delta_p / count).tolist(),
            "kappa_target": target.tolist(),
            "kappa": self.kappa.tolist(),
            "disabled": self.disabled.tolist(),
            "kept_params": self.params.linear_kept().tolist(),
            "full_params": self.params.linear_full.tolist(),
            "heads": [b.widths().heads if b.widths().kind == "attn" else None for b in self.branches],
            **self.costs.log_fields(),
            **({"bound": self.bound} if self.bound else {}),
        }
        if plan:
            record["plan"] = self.planned_layers(target, cache)
        self.reset_accumulators()
        return record

    def _disable_empty_branches(self) -> None:
        """Take emptied branches out of the allocation for good (`prune.allocation` says why).

        A dead branch (some gate exactly 0 everywhere) has measured nothing since the last update:
        no ΔΨ, no Taylor scores, no gradients; regrowing it would pick units by index order, so it
        is disabled under either policy. With `empty_blocks="disable"` a branch whose masks keep no
        element (all < 0.5) is disabled too, although its soft tail still passes a little signal.
        """
        for i, branch in enumerate(self.branches):
            dead = any(not bool((g.mask > 0).any()) for g in branch.gates().values())
            if dead or (branch.widths().empty and self.cfg.empty_blocks == "disable"):
                self.disabled[i] = True

    def _choose(self, i: int, kappa: float, carry: float, cache: dict) -> tuple[dict, float]:
        """The kept widths of branch `i` for κ·cost (+ `carry`), and the shortfall to carry on.

        A branch at κ = 0 (removed or disabled) keeps nothing and passes the carry on untouched; one
        at κ > 0 keeps at least its cheapest non-empty width, whatever the carry (only the allocation
        removes a branch, with its patience). `cache` holds each branch's ranking for this update.
        """
        if "heads" in self.branches[i].gates():
            return self._choose_heads(i, kappa, carry, cache)
        if i not in cache:
            cache[i] = self._order(i)
        scores, order, cost = cache[i]
        raw = kappa * float(cost[-1]) + carry  # what the branch should cost; its debt passes on
        positive = cost[cost > 0]
        target = max(raw, float(positive.min()) if positive.numel() else 0.0) if kappa > 0 else 0.0
        keep_count = threshold_count(cost, target)
        return {"order": order, "keep": keep_count}, (raw - float(cost[keep_count]) if kappa > 0 else carry)

    def _choose_heads(self, i: int, kappa: float, carry: float, cache: dict) -> tuple[dict, float]:
        """Attention with whole heads: the (heads, head dims) pair within κ·cost (+ `carry`) that keeps
        the most importance — the product of the fractions of each gate's importance kept, the top
        heads and the top dims by their Taylor scores (or magnitudes)."""
        if i not in cache:
            gates = self.branches[i].gates()
            scores = self.allocation.local_scores(self.branches[i]).split([g.size for g in gates.values()])
            mass = self.allocation.gate_masses(self.branches[i])
            orders = {name: torch.argsort(s, descending=True, stable=True) for name, s in zip(gates, scores)}
            kept = {name: _kept_fraction(mass[name][orders[name]]) for name in gates}
            cache[i] = orders, kept["heads"].pow(self.cfg.head_weight).unsqueeze(1) * kept["head_dim"].unsqueeze(0)
        orders, value = cache[i]
        grid = self.costs.grid(i)
        raw = kappa * float(grid[-1, -1]) + carry
        target = max(raw, float(grid[1, 1])) if kappa > 0 else 0.0
        # like `threshold_count`: the cost closest to the target may lie one step above it (the carry
        # evens it out over the model); within that cost, the pair that keeps the most importance
        closest = float(grid.flatten()[torch.argmin((grid - target).abs())])
        limit = max(target, closest) + 1e-9
        value = torch.where(grid <= limit, value - 1e-12 * grid / grid[-1, -1], torch.full_like(value, -1.0))
        h, d = divmod(int(torch.argmax(value)), value.shape[1])  # ties: the cheaper pair
        return {"orders": orders, "heads": h, "head_dim": d}, (raw - float(grid[h, d]) if kappa > 0 else carry)

    def _write(self, i: int, widths: dict, tau: float) -> None:
        """Soft masks of branch `i` for the widths `_choose` picked."""
        gates = self.branches[i].gates()
        if "orders" in widths:
            for name in ("heads", "head_dim"):
                n = gates[name].size
                values = torch.empty(n)
                # a handful of heads: the 0.5 point between the last kept head and the first pruned one
                values[widths["orders"][name].flip(0)] = soft_mask_values(
                    n, n - widths[name], tau, self.cfg.m_ref, between=name == "heads"
                )
                gates[name].mask.copy_(values.to(gates[name].mask.device))
            return
        order = widths["order"]
        n = order.numel()
        values = torch.empty(n)
        values[order.flip(0)] = soft_mask_values(n, n - widths["keep"], tau, self.cfg.m_ref)
        for gate, part in zip(gates.values(), values.split([g.size for g in gates.values()])):
            gate.mask.copy_(part.to(gate.mask.device))

    def planned_layers(self, target: torch.Tensor, cache: dict) -> list[dict]:
        """The architecture hard masks at keep ratios `target` would give, as `PrunedArch.layers`
        (the first indices of each width: what it costs to run, not which units it keeps)."""
        s = self.gated.spec
        full = list(range(s.dim))
        layers: list[dict] = [{"attn": None, "mlp": None} for _ in range(s.depth)]
        carry = 0.0
        for i, kappa in enumerate(target.tolist()):
            widths, carry = self._choose(i, kappa, carry, cache)
            gates = self.branches[i].gates()
            if "orders" in widths:
                counts = {"heads": widths["heads"], "head_dim": widths["head_dim"]}
            else:
                gate_id = torch.cat([torch.full((g.size,), j) for j, g in enumerate(gates.values())])
                kept = torch.bincount(gate_id[widths["order"][: widths["keep"]]], minlength=len(gates))
                counts = dict(zip(gates, kept.tolist()))
            if min(counts.values()) == 0:
                continue  # removed or emptied: the layer has no such branch
            branch = {
                "in": full,
                "out": full,
                "read": "dense",
                "write": "dense",
                **{name: list(range(n)) for name, n in counts.items() if name not in ("in", "out")},
            }
            layers[i // 2]["attn" if i % 2 == 0 else "mlp"] = branch
        return layers

    def latency(self) -> LatencyCosts:
        """The latency costs of a run with a latency target (refused for a parameter budget)."""
        if not isinstance(self.costs, LatencyCosts):
            raise P3BError("a parameter budget has no latency target")
        return self.costs

    def retarget(self, target_ms: float, clamp: bool = True) -> float:
        """Allocate for a corrected latency target from the next mask update on (`prune.speed`)."""
        return self.latency().retarget(target_ms, clamp)

    def _param_curve(self, i: int, cache: dict) -> torch.Tensor:
        """Parameters branch `i` keeps at each width `_choose` can pick (its ranking's top k, or the
        (heads, head dims) grid), once per update."""
        key = ("params", i)
        if key not in cache:
            gates = self.branches[i].gates()
            if "heads" in gates:
                cache[key] = self.params.grid(i)
            else:
                gate_id = torch.cat([torch.full((g.size,), j) for j, g in enumerate(gates.values())])
                cache[key] = self.params.curve(i, gate_id[cache[i][1]])
        return cache[key]

    def _kept_params(self, kappa: torch.Tensor, cache: dict) -> float:
        """Branch parameters the hard masks at these keep ratios would keep."""
        total, carry = 0.0, 0.0
        for i, k in enumerate(kappa.tolist()):
            widths, carry = self._choose(i, k, carry, cache)
            curve = self._param_curve(i, cache)
            total += float(curve[widths["heads"], widths["head_dim"]] if "orders" in widths else curve[widths["keep"]])
        return total

    def _targets_within_params(self, removals_open: bool, cache: dict) -> tuple[torch.Tensor, str]:
        """Latency costs under the parameter budget too: the allocation at the latency target when the
        widths it leads to keep no more parameters than the budget ("latency" bound: the model may
        keep fewer); otherwise at the largest share of the branch time (found by bisection) whose
        widths fit the budget ("parameters"). Each try starts from the allocation's state before this
        update, so its smoothing sees one update. The share never reaches 0 (every branch emptied):
        when even the smallest share tried keeps too much — the kept branches' smallest widths alone
        exceed the budget — that share is used and the summary shows the overshoot."""
        state = copy.deepcopy(self.allocation.state_dict())
        ceiling = self.params.budget_share * float(self.params.full.sum())

        def attempt(share: float) -> tuple[torch.Tensor, float]:
            self.allocation.load_state_dict(copy.deepcopy(state))
            target = self.allocation.targets(self.allocation_input(removals_open, share))
            return target, self._kept_params(target, cache)

        target, kept = attempt(self.costs.budget_share)
        if kept <= ceiling:
            return target, "latency"
        lo, hi = 0.0, self.costs.budget_share
        for _ in range(24):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if attempt(mid)[1] <= ceiling else (lo, mid)
        return attempt(lo if lo > 0 else hi)[0], "parameters"

    # ---- reporting and state ---------------------------------------------------------------------

    def kept_branch_params_ratio(self) -> float:
        """Kept branch Linear parameters (mask ≥ 0.5) over all branch Linear parameters."""
        return float(self.params.linear_kept().sum() / self.params.linear_full.sum())

    def total_keep_ratio(self) -> float:
        """Kept parameters of the whole model (unprunable ones included) over all its parameters."""
        return float(self.params.kept_total() / self.params.total_params)

    def extra_state(self) -> dict:
        return {
            "allocation": self.allocation.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "bound": self.bound,
            **({"target_ms": self.costs.target_ms} if isinstance(self.costs, LatencyCosts) else {}),
        }

    def load_extra_state(self, state: dict) -> None:
        self.allocation.load_state_dict(state["allocation"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.bound = state.get("bound")
        if state.get("target_ms") is not None:
            self.retarget(state["target_ms"], clamp=False)


def _kept_fraction(mass: torch.Tensor) -> torch.Tensor:
    """Fraction of a gate's importance kept by its top k elements (`mass` best first), k = 0..n;
    k/n when nothing was measured."""
    total = float(mass.sum())
    n = mass.numel()
    if total <= 0:
        return torch.arange(n + 1, dtype=torch.float64) / n
    return torch.cat([torch.zeros(1, dtype=torch.float64), mass.double().cumsum(0) / total])
