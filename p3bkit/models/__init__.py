"""Model adapters, gates, pruned blocks and the architecture file (shared by every stage)."""
from p3bkit.models.adapter import ViTSpec, inspect_vit
from p3bkit.models.arch import ModelSource, PrunedArch, apply_arch, create_stock_model, load, read_arch, save
from p3bkit.models.gates import Gate, GatedViT, add_gates

__all__ = ["Gate", "GatedViT", "ModelSource", "PrunedArch", "ViTSpec", "add_gates", "apply_arch",
           "create_stock_model", "inspect_vit", "load", "read_arch", "save"]
