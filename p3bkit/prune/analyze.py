"""`p3bkit analyze`: Block Performance plots like the paper's Figures 5–8 (Appendix G–I).

For a prune run it reads `log.jsonl` (ΔΨᶜ, ΔΨᵖ and κ of every mask update) and `pruned/arch.json`.
For a plain model (or its weights file) it freezes the model and trains only the BPI heads on the data
(Appendix I), then measures ΔΨ. Writes `block_performance.png`, `keep_ratios.png`,
`kept_widths.png` (runs with a pruned model) and `index.html` with the figures and the numbers.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import torch

from p3bkit.errors import P3BError


def read_run(run: str | Path) -> dict:
    """ΔΨ averaged over all mask updates, the final κ, and the kept widths of a prune run."""
    path = Path(run) / "log.jsonl"
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise P3BError(f"{path}: unreadable prune log ({exc})") from exc
    updates = [r for r in records if r.get("type") == "mask_update"]
    if not updates:
        raise P3BError(f"{path}: no mask updates logged yet")
    n = len(updates[0]["delta_c"])
    mean = lambda key: [sum(u[key][i] for u in updates) / len(updates) for i in range(n)]  # noqa: E731
    out = {
        "label": Path(run).name,
        "delta_c": mean("delta_c"),
        "delta_p": mean("delta_p"),
        "kappa": updates[-1]["kappa"],
        "updates": len(updates),
    }
    arch = Path(run) / "pruned" / "arch.json"
    if arch.is_file():
        out["layers"] = json.loads(arch.read_text())["layers"]
    summary = Path(run) / "summary.json"
    if summary.is_file():  # both rates: of all parameters (the paper's) and of block parameters
        s = json.loads(summary.read_text())
        out["rates"] = {k: s[k] for k in ("budget", "prune_rate_total", "prune_rate_blocks") if k in s}
    return out


class _Batches:
    """Exactly `steps` training batches, the data reshuffled on every pass (a sized iterable: the
    skeleton's progress bar and time estimate know the length)."""

    def __init__(self, bundle, batch_size: int, seed: int, steps: int) -> None:
        self.bundle, self.batch_size, self.seed, self.steps = bundle, batch_size, seed, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        from p3bkit.data import make_loader

        step = 0
        while step < self.steps:
            for batch in make_loader(self.bundle.train, self.batch_size, True, seed=self.seed + step):
                yield batch
                step += 1
                if step >= self.steps:
                    return


def measure_model(
    model_ref: str,
    data: str | None = None,
    steps: int = 200,
    batch_size: int = 64,
    weights: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train only the BPI heads on the frozen model, then average ΔΨ over the second half of the steps.

    The steps run through the run skeleton (`train.run.run_epochs`, one epoch of `steps` batches):
    its progress bar, the time estimate of a long run and the line it ends with. Nothing is
    checkpointed: the measurement is short and writes nothing until the report."""
    from p3bkit.console import notify
    from p3bkit.data import load_data
    from p3bkit.models.factory import create_model
    from p3bkit.models.presets import default_data
    from p3bkit.models.source import model_source
    from p3bkit.prune.bpi import BPI, StateRecorder, ce_loss
    from p3bkit.prune.recipes import RECIPES
    from p3bkit.train.dist import DistContext, require_device
    from p3bkit.train.fit import seed_everything
    from p3bkit.train.run import EpochLoop, run_epochs

    require_device(device)
    seed_everything(seed)
    model = create_model(model_ref, weights=weights).to(device).eval().requires_grad_(False)
    bundle = load_data(
        data or default_data(model_source(model, fallback="arch"), notify),
        img_size=model.patch_embed.img_size[0],
        num_classes=model.num_classes,
        in_chans=model.patch_embed.proj.in_channels,
    )
    bpi = BPI.for_model(model).to(device)
    # the BPI rate a quick prune run trains them with (a base rate at batch 512, scaled: 5e-4 at 64)
    lr = RECIPES["quick"].lr_bpi * batch_size / 512
    opt = torch.optim.AdamW(bpi.parameters(), lr=lr, weight_decay=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    rec, losses = StateRecorder(model), []  # the BPI loss of every step
    late: list[tuple[torch.Tensor, torch.Tensor]] = []  # ΔΨᶜ and ΔΨᵖ of the second half's steps

    def step(epoch: int, batch) -> dict:
        x, y = batch[0].to(device), batch[1].to(device)
        with torch.no_grad():
            model(x)
        loss, d_c, d_p = bpi(rec.take(), y, ce_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if len(losses) > steps // 2:
            late.append((d_c.detach().cpu(), d_p.detach().cpu()))
        return {"loss": losses[-1]}

    def ends() -> tuple[float, float]:
        """The BPI loss at the start and at the end, each averaged over a fifth of the steps."""
        k = max(1, len(losses) // 5)
        return sum(losses[:k]) / k, sum(losses[-k:]) / k

    def end_epoch(epoch: int, done: int) -> str:
        first, last = ends()
        return f"{done} steps, BPI loss {first:.3f} → {last:.3f}"

    loop = EpochLoop(
        epochs=1,
        loader=lambda epoch, first: _Batches(bundle, batch_size, seed, steps),
        step=step,
        end_epoch=end_epoch,
        state=dict,
        desc="analyze",
        progress=progress,
    )
    try:
        run_epochs(loop, DistContext(device=device))
    finally:
        rec.remove()
    change = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
    return {
        "label": Path(weights or model_ref).name,
        "delta_c": torch.stack([c for c, _ in late]).mean(0).tolist(),
        "delta_p": torch.stack([p for _, p in late]).mean(0).tolist(),
        "updates": 0,
        "bpi_loss": list(ends()),
        "model_change": change,
    }


def _png(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return base64.b64encode(path.read_bytes()).decode()


def plot_block_performance(runs: list[dict], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = {}
    fig, axes = plt.subplots(2, 2, figsize=(11, 6), sharex=True)
    width = 0.8 / len(runs)
    for j, run in enumerate(runs):
        for row, key in enumerate(("delta_c", "delta_p")):
            for col, kind in enumerate(("Attention", "MLP")):
                vals = run[key][col::2]
                axes[row, col].bar([i + j * width for i in range(len(vals))], vals, width, label=run["label"])
                axes[row, col].set_title(f"{'class' if key == 'delta_c' else 'patch'} BP ΔΨ — {kind} blocks")
    for ax in axes[1]:
        ax.set_xlabel("layer")
    axes[0, 0].legend(fontsize=7)
    images["block_performance"] = _png(fig, out / "block_performance.png")
    plt.close(fig)
    with_kappa = [r for r in runs if "kappa" in r]
    if with_kappa:
        fig, ax = plt.subplots(figsize=(11, 3.2))
        width = 0.8 / len(with_kappa)
        for j, run in enumerate(with_kappa):
            ax.bar([i + j * width for i in range(len(run["kappa"]))], run["kappa"], width, label=run["label"])
        ax.set_xlabel("block (even: Attention, odd: MLP)")
        ax.set_ylabel("keep ratio κ")
        ax.legend(fontsize=7)
        images["keep_ratios"] = _png(fig, out / "keep_ratios.png")
        plt.close(fig)
    arch_run = next((r for r in runs if "layers" in r), None)
    if arch_run:
        images["kept_widths"] = _heatmap(arch_run, out, plt)
    return images


def _heatmap(run: dict, out: Path, plt) -> str:
    """Kept widths per layer (heads too, where whole heads were pruned); removed branches are 0."""
    heads = any(b and "heads" in b for layer in run["layers"] for b in (layer["attn"],))
    cols = [
        "attn.in",
        *(["attn.heads"] if heads else []),
        "attn.head_dim",
        "attn.out",
        "mlp.in",
        "mlp.hidden",
        "mlp.out",
    ]
    rows = []
    for layer in run["layers"]:
        a, m = layer["attn"], layer["mlp"]
        row = [
            len(a["in"]) if a else 0,
            *([len(a.get("heads", [])) if a else 0] if heads else []),
            len(a["head_dim"]) if a else 0,
            len(a["out"]) if a else 0,
        ]
        row += [len(m[k]) if m else 0 for k in ("in", "hidden", "out")]
        rows.append(row)
    full = [max(r[c] for r in rows) or 1 for c in range(len(cols))]
    frac = [[r[c] / full[c] for c in range(len(cols))] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(rows) + 1.5))
    im = ax.imshow(frac, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, fontsize=8)
    ax.set_ylabel("layer")
    for i, r in enumerate(rows):
        for c, v in enumerate(r):
            ax.text(c, i, str(v), ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, label="kept fraction (of the widest); 0: removed")
    img = _png(fig, out / "kept_widths.png")
    plt.close(fig)
    return img


REPORT_FILES = ("index.html", "block_performance.json", "block_performance.png", "keep_ratios.png", "kept_widths.png")


def write_report(runs: list[dict], out: str | Path) -> Path:
    """The report (REPORT_FILES) written into a temporary folder beside `out`, then moved in file by
    file under the folder's lock (an earlier report's files this one lacks removed): a failed run
    leaves the previous report as it was."""
    import os
    import shutil
    import tempfile

    from p3bkit.fileio import folder_lock

    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.analyze-", dir=out.parent))
    except OSError as exc:
        raise P3BError(f"cannot write the report beside {out}: {exc.strerror or exc}") from exc
    try:
        _write_report(runs, tmp)
        out.mkdir(exist_ok=True)
        with folder_lock(out):
            made = {f.name for f in tmp.iterdir()}
            for name in set(REPORT_FILES) - made:  # an earlier report's figure this one does not have
                (out / name).unlink(missing_ok=True)
            for name in sorted(made):
                os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html"


def _write_report(runs: list[dict], out: Path) -> None:
    images = plot_block_performance(runs, out)
    parts = [
        "<html><head><meta charset='utf-8'><title>p3bkit block performance</title></head><body>",
        "<h1>Block Performance (ΔΨ) per Attention and MLP block</h1>",
    ]
    for name, data in images.items():
        parts.append(f"<h2>{name.replace('_', ' ')}</h2><img src='data:image/png;base64,{data}'>")
    for run in runs:
        parts.append(f"<h2>{html.escape(run['label'])}</h2>")
        r = run.get("rates", {})
        if "prune_rate_total" in r:
            parts.append(
                f"<p>pruned {100 * r['prune_rate_total']:.1f}% of all parameters, "
                f"{100 * r['prune_rate_blocks']:.1f}% of block parameters (budget: {r.get('budget', '?')})</p>"
            )
        if "layers" in run:
            removed = [f"{i}.{k}" for i, layer in enumerate(run["layers"]) for k in ("attn", "mlp") if not layer[k]]
            heads = [
                len(layer["attn"]["heads"]) for layer in run["layers"] if layer["attn"] and "heads" in layer["attn"]
            ]
            parts.append(
                f"<p>branches removed: {', '.join(removed) or 'none'}"
                + (f"; heads kept per attention branch: {heads}" if heads else "")
                + "</p>"
            )
        parts.append("<table border=1><tr><th>block</th><th>ΔΨᶜ</th><th>ΔΨᵖ</th><th>κ</th></tr>")
        for i, (c, p) in enumerate(zip(run["delta_c"], run["delta_p"])):
            kappa = f"{run['kappa'][i]:.6g}" if "kappa" in run else "–"
            parts.append(
                f"<tr><td>{i // 2}.{'attn' if i % 2 == 0 else 'mlp'}</td><td>{c:.6g}</td><td>{p:.6g}</td>"
                f"<td>{kappa}</td></tr>"
            )
        parts.append("</table>")
    (out / "index.html").write_text("\n".join(parts) + "</body></html>")
    (out / "block_performance.json").write_text(json.dumps(runs, indent=1))
