"""The training step's fast path stays harmless on CPU: nothing is compiled there, the
device-side skip of non-finite steps is CUDA-only (checked on a GPU), and the bench runs."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from magic3d.priors.configs import default_config  # noqa: E402
from magic3d.priors.loop import MAX_SKIPPED, make_phase, run_phase  # noqa: E402
from magic3d.priors.objective import maybe_compile  # noqa: E402


def _phase(device: str):
    model = nn.Linear(4, 1).to(device)
    return model, make_phase("unet", {"unet": model}, 1e-2, {}, 0.0, 0.9, torch.device(device))


def test_compile_is_off_on_cpu_even_when_configured() -> None:
    config = dataclasses.replace(default_config("pixel", smoke=True), compile=True)
    module = nn.Linear(2, 2)
    assert maybe_compile(module, config, torch.device("cpu")) is module


def test_cpu_loop_skips_non_finite_steps_then_gives_up() -> None:
    model, phase = _phase("cpu")
    config = default_config("pixel", smoke=True)
    before = model.weight.detach().clone()
    x = torch.ones(3, 4)

    def nan_loss() -> torch.Tensor:
        loss = (model(x) * float("nan")).mean()
        return torch.stack([loss, loss])

    with pytest.raises(FloatingPointError, match="non-finite gradients"):
        run_phase(phase, nan_loss, 1e9, 5, config, lambda: None, "t", lambda _: None)
    assert phase.step == 0  # no step was counted
    torch.testing.assert_close(model.weight, before, rtol=0, atol=0)  # and no update was applied


@pytest.mark.gpu
def test_cuda_loop_skips_a_non_finite_step_on_the_device() -> None:
    model, phase = _phase("cuda")
    config = dataclasses.replace(default_config("pixel", smoke=True), log_every=4)
    x = torch.ones(3, 4, device="cuda")
    calls = []

    def loss_fn() -> torch.Tensor:
        calls.append(1)
        scale = float("nan") if len(calls) == 2 else 1.0
        loss = (model(x) * scale).pow(2).mean()
        return torch.stack([loss, loss])

    weights = []
    logs: list[str] = []
    run_phase(phase, loss_fn, 1e9, 1, config, lambda: None, "t", logs.append)
    weights.append(model.weight.detach().clone())
    run_phase(phase, loss_fn, 1e9, 2, config, lambda: None, "t", logs.append)  # the NaN step
    # fused AdamW saw found_inf = 1: weights unchanged, no NaN written
    torch.testing.assert_close(model.weight, weights[0], rtol=0, atol=0)
    assert torch.isfinite(model.weight).all()
    assert not hasattr(phase.optimizer, "found_inf")  # cleared for later eager steps
    assert MAX_SKIPPED >= 1


def test_bench_cli_runs_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    from magic3d.priors.__main__ import main

    code = main(["bench", "--smoke", "--device", "cpu", "--variants", "pixel:unet:2:eager", "--steps", "1", "--warmup", "1"])
    assert code == 0
    assert "pixel_unet_b2_eager_default" in capsys.readouterr().out


def test_bench_variant_syntax_is_checked() -> None:
    from magic3d.priors.bench import Variant

    assert Variant.parse("latent:vae:32:compile:reduce-overhead") == Variant("latent", "vae", 32, True, "reduce-overhead")
    with pytest.raises(ValueError, match="kind:phase:batch"):
        Variant.parse("pixel:256")
