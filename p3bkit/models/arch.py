"""Pruned models as plain data: `arch.json` + `model.safetensors`.

Loading follows timm's `build_model_with_cfg` for pruned variants: create the stock model with
`pretrained=False` → apply the architecture file → `load_state_dict(strict=True)`. Nothing is
unpickled and nothing touches the network.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from p3bkit.errors import ArchError, first_line
from p3bkit.models.adapter import TimmModule, ViTSpec, inspect_vit
from p3bkit.models.pruned import PrunedLayer, build_attn_branch, build_mlp_branch

SCHEMA_VERSION = 2  # 2: an attention branch may keep a subset of its heads ("heads"); 1 kept them all
READABLE_SCHEMAS = (1, 2)
ARCH_FILE, WEIGHTS_FILE = "arch.json", "model.safetensors"
BRANCH_KEYS = {"attn": ("in", "head_dim", "out"), "mlp": ("in", "hidden", "out")}
OPTIONAL_KEYS = {"attn": ("heads",), "mlp": ()}


@dataclass
class ModelSource:
    """How to build the stock model: a timm name and keyword overrides (plain JSON values)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrunedArch:
    """Kept indices per layer. A branch is None when removed (identity residual), else a dict with
    `in`/`head_dim`|`hidden`/`out` index lists, for attention optionally `heads` (the kept heads;
    absent: all of them), and `read` ('gather'|'dense'), `write` ('scatter'|'dense'): 'dense'
    folds the channel selection into zero weight rows/columns."""

    source: ModelSource
    layers: list[dict[str, dict | None]]
    structure: str = "full"
    round_to: int = 1
    schema: int = SCHEMA_VERSION
    versions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: str = ARCH_FILE) -> PrunedArch:
        if not isinstance(data, dict) or data.get("schema") not in READABLE_SCHEMAS:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ArchError(
                f"{where}: unsupported schema version {found!r} (this p3bkit reads "
                f"{', '.join(map(str, READABLE_SCHEMAS))})"
            )
        try:
            src = ModelSource(**data["source"])
            arch = cls(
                source=src,
                layers=data["layers"],
                structure=data["structure"],
                round_to=int(data["round_to"]),
                schema=data["schema"],
                versions=data.get("versions", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArchError(f"{where}: malformed architecture file ({exc})") from exc
        arch.validate(where)
        return arch

    def validate(self, where: str = ARCH_FILE) -> None:
        for i, layer in enumerate(self.layers):
            for kind, keys in BRANCH_KEYS.items():
                branch = layer.get(kind, "missing") if isinstance(layer, dict) else "missing"
                if branch is None:
                    continue
                if not isinstance(branch, dict) or any(not isinstance(branch.get(k), list) for k in keys):
                    raise ArchError(f"{where}: layer {i} {kind} must be null or have index lists {keys}")
                if any(k in branch and not isinstance(branch[k], list) for k in OPTIONAL_KEYS[kind]):
                    raise ArchError(f"{where}: layer {i} {kind}: {OPTIONAL_KEYS[kind]} must be index lists")


def apply_arch(model: TimmModule, arch: PrunedArch, spec: ViTSpec | None = None) -> TimmModule:
    """Replace the blocks of a timm ViT by the pruned blocks `arch` describes (in place).

    `spec` skips the structure check, for a model whose blocks already carry gates (surgery).
    """
    spec = spec or inspect_vit(model)
    if not arch.layers:  # a dense (unpruned) model saved as a folder: the stock blocks stay
        model.p3b_arch = arch
        return model
    if len(arch.layers) != spec.depth:
        raise ArchError(f"architecture has {len(arch.layers)} layers but the model has {spec.depth}")
    for i, layer in enumerate(arch.layers):
        blk = model.blocks[i]
        _check_ranges(i, layer, spec)
        attn = build_attn_branch(blk, blk.attn, layer["attn"], spec.dim) if layer["attn"] else nn.Identity()
        mlp = build_mlp_branch(blk, blk.mlp, layer["mlp"], spec.dim) if layer["mlp"] else nn.Identity()
        model.blocks[i] = PrunedLayer(attn, mlp)
    model.p3b_arch = arch
    return model


def _check_ranges(i: int, layer: dict, spec) -> None:
    limits = {
        "in": spec.dim,
        "out": spec.dim,
        "head_dim": spec.head_dim,
        "hidden": spec.mlp_hidden,
        "heads": spec.num_heads,
    }
    for kind in ("attn", "mlp"):
        branch = layer[kind]
        for key in (*BRANCH_KEYS[kind], *(k for k in OPTIONAL_KEYS[kind] if k in (branch or {}))) if branch else ():
            idx = branch[key]
            if not idx or len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= limits[key]:
                raise ArchError(f"layer {i} {kind}.{key}: indices must be distinct, in [0, {limits[key]}), non-empty")


def create_stock_model(source: ModelSource, pretrained: bool = False, overlay: dict | None = None) -> TimmModule:
    """timm.create_model(source.name, pretrained, **source.kwargs), tagged with its source.

    `overlay` is timm's `pretrained_cfg_overlay` (e.g. a local weights `file`).
    """
    import timm

    extra: dict[str, Any] = {"pretrained_cfg_overlay": overlay} if overlay else {}
    try:
        model: TimmModule = timm.create_model(source.name, pretrained=pretrained, **source.kwargs, **extra)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ArchError(f"cannot create timm model {source.name!r}: {first_line(exc)}") from exc
    model.p3b_source = source
    return model


def save(model: nn.Module, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `arch.json` + `model.safetensors` into `folder`, each file atomically.

    `folder` must be new or empty unless `overwrite` (then its two model files are replaced and
    nothing else in it is touched). Both files are written to a temp folder beside the target
    first, and the model is rebuilt from them and compared before anything moves into place. Files
    get the usual permissions (rw-r--r-- under umask 022).
    """
    from safetensors.torch import save_file

    from p3bkit.fileio import set_usual_permissions

    arch = getattr(model, "p3b_arch", None) or _dense_arch(model)
    if arch.source.name not in _timm_names():
        raise ArchError(
            f"cannot save a model p3bkit cannot rebuild: {arch.source.name!r} is not a timm model name "
            "(build the model with timm.create_model or p3bkit.create_model)"
        )
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ArchError(f"cannot save a model to {folder}: it exists and is not a folder")
    from p3bkit.fileio import LOCK, check_not_in_use

    if folder.is_dir():
        check_not_in_use(folder)  # a folder another run is writing: refused, overwrite or not
    if not overwrite and folder.is_dir() and any(p.name != LOCK for p in folder.iterdir()):
        raise ArchError(
            f"cannot save a model to {folder}: it is not empty (save(..., overwrite=True) replaces "
            "its arch.json and model.safetensors)"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / ARCH_FILE).write_text(json.dumps(arch.to_json(), indent=1))
        for f in (WEIGHTS_FILE, ARCH_FILE):
            set_usual_permissions(tmp / f)
        _check_rebuilds(model, tmp)  # what cannot be reloaded is never moved into place
        if folder.exists():
            for f in (WEIGHTS_FILE, ARCH_FILE):
                os.replace(tmp / f, folder / f)
        else:
            set_usual_permissions(tmp)
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _timm_names() -> set[str]:
    import timm

    return set(timm.list_models())


def _dense_arch(model: nn.Module) -> PrunedArch:
    """The architecture file of an unpruned model (no layers: the stock blocks stay)."""
    from p3bkit.models.source import model_source

    inspect_vit(model)
    source = model_source(model, fallback="infer")
    return PrunedArch(source=source, layers=[], structure="dense", versions=versions())


def versions() -> dict[str, str]:
    """The versions an architecture file records (python, p3bkit, timm, torch)."""
    from p3bkit.version import package_versions

    return package_versions()


def _check_rebuilds(model: TimmModule, folder: Path) -> None:
    """Rebuild the model from what was written and compare outputs on a seeded input."""
    import torch

    rebuilt = load(folder)
    pe = rebuilt.patch_embed
    x = torch.randn(1, pe.proj.in_channels, *pe.img_size, generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want, got = model(x.to(device)).float().cpu(), rebuilt(x).float()
    finally:
        model.train(was_training)
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-5):
        diff = (want - got).abs().max().item() if want.shape == got.shape else f"shape {tuple(got.shape)}"
        raise ArchError(
            f"the model rebuilt from {ARCH_FILE} ({read_arch(folder).source.name}) does not reproduce the model "
            f"being saved (max abs diff {diff}); nothing was written"
        )


def read_arch(folder: str | os.PathLike) -> PrunedArch:
    path = Path(folder) / ARCH_FILE
    if not path.is_file():
        raise ArchError(f"{folder}: not a pruned model folder (no {ARCH_FILE})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArchError(f"{path}: not valid JSON ({exc})") from exc
    return PrunedArch.from_json(data, str(path))


def load(folder: str | os.PathLike) -> TimmModule:
    """Rebuild a pruned model from its folder (no pickles, no network), in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    arch = read_arch(folder)
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise ArchError(f"{folder}: missing {WEIGHTS_FILE}")
    model = apply_arch(create_stock_model(arch.source), arch)
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as exc:
        raise ArchError(f"{weights}: unreadable safetensors file ({exc})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ArchError(f"{weights} does not match {ARCH_FILE}: {' '.join(first[:3])[:400]}") from exc
    return model.eval()
