"""Block Performance Indicator (Appendix A): per block a class head and a patch head.

Each prunable block i gets Ψᶜᵢ (a Linear layer on the class token, as in the paper and the
authors' code; on the mean token for models without one; a second one on the distillation token
for DeiT distilled models; `class_head="norm-linear"` puts a LayerNorm in front, like the ViT's
own head) and Ψᵖᵢ (one ResNet basic block on the patch grid + global average pool +
Linear). Both see the block's input x_{i−1} and output x_i, detached, so the BPI never trains
the backbone. ΔΨᵢ = L(Ψᵢ(x_{i−1})) − L(Ψᵢ(x_i)).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, cast

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock

from p3bkit.errors import P3BError
from p3bkit.prune.config import ClassHead

if TYPE_CHECKING:
    from p3bkit.models.adapter import TimmModule

Criterion = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None], torch.Tensor]


def ce_loss(
    cls: torch.Tensor, dist: torch.Tensor | None, y: torch.Tensor, teacher: torch.Tensor | None
) -> torch.Tensor:
    """Cross entropy on the class logits (the default BPI / model loss); `y` may be soft (Mixup)."""
    return nn.functional.cross_entropy(cls, y)


def hard_distillation_loss(
    cls: torch.Tensor, dist: torch.Tensor | None, y: torch.Tensor, teacher: torch.Tensor | None
) -> torch.Tensor:
    """DeiT hard distillation: ½·CE(class, y) + ½·CE(dist, argmax teacher) (Appendix F, Eq. 10)."""
    if teacher is None:
        raise P3BError("hard distillation needs the teacher's logits (none were computed for this batch)")
    dist = cls if dist is None else dist
    return 0.5 * nn.functional.cross_entropy(cls, y) + 0.5 * nn.functional.cross_entropy(dist, teacher)


MIN_INDICATOR_IMAGES = 16  # below this ΔΨ per step is a handful of images and the patch heads' BatchNorm degenerates


def indicator_images(batch: int, fraction: float) -> int:
    """How many images of a batch the indicators see: `fraction` of it, at least
    `MIN_INDICATOR_IMAGES` (or the whole batch when it is smaller). Before and after states go
    through a patch head's BatchNorm in one call, so it normalises 2·m images: with m = 1 its
    statistics are two images', and ΔΨ of a window of `update_every` steps averages very few."""
    return min(batch, max(MIN_INDICATOR_IMAGES, round(batch * fraction)))


class PatchHead(nn.Module):
    """One ResNet basic block on the (B, C, h, w) patch grid, global average pool, Linear."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.block = BasicBlock(dim, dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(grid).mean((2, 3)))


def _class_head(kind: ClassHead, dim: int, num_classes: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(dim, num_classes)
    if kind == "norm-linear":
        return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
    raise ValueError(f"BPI class head must be 'linear' or 'norm-linear', got {kind!r}")


class BlockIndicator(nn.Module):
    """Ψᶜ and Ψᵖ for one block."""

    def __init__(self, dim: int, num_classes: int, distilled: bool, class_head: ClassHead = "linear") -> None:
        super().__init__()
        self.cls = _class_head(class_head, dim, num_classes)
        self.dist = _class_head(class_head, dim, num_classes) if distilled else None
        self.patch = PatchHead(dim, num_classes)


class BPI(nn.Module):
    """The indicators of all 2·depth blocks and the ΔΨ they measure."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_classes: int,
        grid: tuple[int, int],
        num_prefix_tokens: int,
        has_class_token: bool,
        distilled: bool,
        class_head: ClassHead = "linear",
    ) -> None:
        super().__init__()
        self.grid, self.prefix = grid, num_prefix_tokens
        self.has_class_token, self.distilled = has_class_token, distilled
        self.heads = nn.ModuleList(BlockIndicator(dim, num_classes, distilled, class_head) for _ in range(2 * depth))

    @classmethod
    def for_model(cls, model: TimmModule, class_head: ClassHead = "linear") -> BPI:
        # an attention-pool model does not classify from its class token: its class head reads the mean token
        class_token = getattr(model, "cls_token", None) is not None and getattr(model, "global_pool", "") != "map"
        return cls(
            model.embed_dim,
            len(model.blocks),
            model.num_classes,
            tuple(model.patch_embed.grid_size),
            model.num_prefix_tokens,
            class_token,
            getattr(model, "dist_token", None) is not None,
            class_head,
        )

    def _logits(self, head: BlockIndicator, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        patches = x[:, self.prefix :]
        token = x[:, 0] if self.has_class_token else patches.mean(1)
        dist = head.dist(x[:, 1]) if head.dist is not None else None
        grid = patches.transpose(1, 2).reshape(x.shape[0], x.shape[-1], *self.grid)
        return head.cls(token), dist, head.patch(grid)

    def forward(
        self, states: list[torch.Tensor], y: torch.Tensor, criterion: Criterion, teacher: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Total BPI loss (to train the heads) and ΔΨᶜ, ΔΨᵖ per block (detached).

        `states` are the 2·depth+1 residual-stream states: block i reads states[i], writes states[i+1].
        """
        losses_c, losses_p = [], []
        for i, head in enumerate(self.heads):
            # before and after in one call: half the head calls (the patch heads' BatchNorm then
            # normalises both states with the same statistics, which is what their difference compares)
            c, d, p = self._logits(cast(BlockIndicator, head), torch.cat([states[i].detach(), states[i + 1].detach()]))
            cs, ps = c.chunk(2), p.chunk(2)
            ds = d.chunk(2) if d is not None else (None, None)
            losses_c.append(torch.stack([criterion(cs[j], ds[j], y, teacher) for j in (0, 1)]))
            losses_p.append(torch.stack([criterion(ps[j], ps[j], y, teacher) for j in (0, 1)]))
        lc, lp = torch.stack(losses_c), torch.stack(losses_p)  # (2·depth, 2): before / after
        total = lc.sum() + lp.sum()
        return total, (lc[:, 0] - lc[:, 1]).detach(), (lp[:, 0] - lp[:, 1]).detach()


class StateRecorder:
    """Records the residual stream before/after every Attention and MLP branch via hooks."""

    def __init__(self, model: TimmModule) -> None:
        self.states: list[torch.Tensor] = []
        self._handles = []
        for blk in model.blocks:
            # the stream between the branches enters norm2 (timm Block) or the MLP residual (PrunedLayer)
            mid = blk.norm2 if hasattr(blk, "norm2") else blk.mlp
            self._handles.append(blk.register_forward_pre_hook(self._pre))
            self._handles.append(mid.register_forward_pre_hook(self._pre))
        self._handles.append(model.blocks[-1].register_forward_hook(self._post))

    def _pre(self, module: nn.Module, args: tuple) -> None:
        self.states.append(args[0])

    def _post(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.states.append(output)

    def take(self) -> list[torch.Tensor]:
        states, self.states = self.states, []
        return states

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
