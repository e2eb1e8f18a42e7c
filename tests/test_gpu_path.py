"""The GPU path's safety switches, checked on the CPU: fused SGD keeps GradScaler off the host, cudnn.benchmark follows the config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flowers_dist.config import OptimConfig, load
from flowers_dist.steps import build_optimizer


def _items_per_scaled_step(fused: bool) -> int:
    """How many Tensor.item() calls one GradScaler step + update makes (each is a host sync on CUDA)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    optimizer = build_optimizer(OptimConfig(lr=0.1), model, fused=fused)
    scaler = torch.amp.GradScaler("cpu")  # the same Python code path as on CUDA, runnable here
    loss = F.cross_entropy(model(torch.randn(4, 8)), torch.tensor([0, 1, 2, 0]))
    scaler.scale(loss).backward()
    calls, real_item = [], torch.Tensor.item

    def counting_item(self):
        calls.append(1)
        return real_item(self)

    torch.Tensor.item = counting_item
    try:
        scaler.step(optimizer)
        scaler.update()
    finally:
        torch.Tensor.item = real_item
    return len(calls)


def test_fused_sgd_takes_the_scalers_step_without_a_host_read():
    assert _items_per_scaled_step(fused=False) >= 1  # the plain optimizer: found_inf read on the host
    assert _items_per_scaled_step(fused=True) == 0


def test_fused_sgd_steps_as_the_plain_one_does():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)
    b.load_state_dict(a.state_dict())
    cfg = OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    opt_a, opt_b = build_optimizer(cfg, a), build_optimizer(cfg, b, fused=True)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("saved_fused,now_fused", [(False, True), (True, False)])
def test_a_resumed_optimizer_keeps_this_devices_choice(saved_fused, now_fused):
    # A CPU run's checkpoint resumed on CUDA under fp16 must stay fused, or the scaler hands its
    # tensors to the unfused step (which raises); the reverse must not force the fused kernel.
    model = torch.nn.Linear(4, 2)
    saved = build_optimizer(OptimConfig(), model, fused=saved_fused).state_dict()
    resumed = build_optimizer(OptimConfig(), model, fused=now_fused)
    resumed.load_state_dict(saved)
    assert all(bool(g["fused"]) == now_fused for g in resumed.param_groups)


def test_cudnn_benchmark_is_a_config_key_on_by_default():
    assert load(None).train.cudnn_benchmark is True
    assert load(None, ["train.cudnn_benchmark=false"]).train.cudnn_benchmark is False
