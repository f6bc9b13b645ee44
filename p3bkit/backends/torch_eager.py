"""Eager PyTorch: runs model references (pruned folders, presets, timm names); exports nothing."""

from __future__ import annotations

from p3bkit.backends.registry import BF16, FP16, FP32, Backend, FnRunner, Runner, register
from p3bkit.backends.timing import Timed
from p3bkit.models.outputs import logits_of


def _autocast(device: str, precision: str):
    import torch

    dtype = {FP16: torch.float16, BF16: torch.bfloat16}.get(precision)
    return torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None)


def _sync_for(device: str):
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


@register
class TorchBackend(Backend):
    name, packages, extra = "torch", ("torch",), ""
    precisions = {FP32: "float32", FP16: "float16", BF16: "bfloat16"}

    def run_precisions(self, artefact_precision: str) -> tuple[str, ...]:
        return tuple(self.precisions)

    def status(self) -> tuple[bool, str]:
        import torch

        return True, f"CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU visible'}"

    def _model(self, ref: str, device: str):
        from p3bkit.models.factory import create_model

        return create_model(str(ref)).to(device).eval()

    def check_device(self, device: str | None) -> str:
        return device or "cpu"  # any torch device: cpu, cuda, cuda:N

    def runner(self, path, precision=None, threads=None, device=None) -> Runner:
        """A model reference run eagerly on `device`, autocast to `precision`."""
        import torch

        device = self.check_device(device)
        model = self._model(path, device)
        run_precision = self.precision(precision)

        @torch.inference_mode()
        def run(x) -> dict:
            with _autocast(device, run_precision):
                return {"logits": logits_of(model(torch.from_numpy(x).to(device))).float().cpu().numpy()}

        return FnRunner(run, [None, model.patch_embed.proj.in_channels, *model.patch_embed.img_size])

    def timer(self, ref, batch, precision, threads=None, device=None, compile=False) -> Timed:
        import torch

        device = self.check_device(device)
        model = self._model(ref, device)
        x = torch.randn(batch, model.patch_embed.proj.in_channels, *model.patch_embed.img_size, device=device)
        t = self._timed(torch.compile(model) if compile else model, x, device, precision)
        return Timed(str(ref), self.name, t.step, t.sync, str(ref), t.profile, precision)

    def time_module(self, module, x, workdir, whole, threads=None, device=None) -> Timed:
        """The module itself, eagerly (no export)."""
        device = self.check_device(device)
        return self._timed(module.eval().to(device), x.to(device), device, FP32)

    def _timed(self, fn, x, device: str, precision: str) -> Timed:
        import torch

        @torch.inference_mode()
        def step():
            with _autocast(device, precision):
                return fn(x)

        def profile(runs: int) -> dict[str, float]:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as tprof

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
            with tprof(activities=acts) as prof:
                for _ in range(runs):
                    step()
            return {
                e.key: e.self_cpu_time_total / 1e3 / runs for e in prof.key_averages() if e.key.startswith("aten::")
            }

        return Timed("module", self.name, step, _sync_for(device), profile=profile, precision=precision)
