import pytest

from flowers_dist.config import OptimConfig
from flowers_dist.schedule import lr_at


def test_step_schedule_of_the_recipe():
    cfg = OptimConfig(lr=1e-3, schedule="step", step_size=7, gamma=0.1)
    expected = {0: 1e-3, 6: 1e-3, 7: 1e-4, 13: 1e-4, 14: 1e-5, 20: 1e-5, 21: 1e-6, 24: 1e-6}
    for epoch, lr in expected.items():
        assert lr_at(cfg, epoch, 25) == pytest.approx(lr, rel=1e-12), epoch


def test_cosine_and_warmup():
    cfg = OptimConfig(lr=0.1, schedule="cosine", warmup_epochs=2)
    assert lr_at(cfg, 0, 10) == pytest.approx(0.01)
    assert lr_at(cfg, 2, 10) == pytest.approx(0.1 * 0.5 * (1 + __import__("math").cos(__import__("math").pi * 0.2)))
    assert lr_at(cfg, 9, 10) < lr_at(cfg, 5, 10) < lr_at(cfg, 2, 10)


def test_constant():
    assert lr_at(OptimConfig(lr=0.5, schedule="constant"), 17, 25) == 0.5


from flowers_dist.schedule import base_lr, lr_at_step  # noqa: E402


def _lr(cfg, epoch, step, steps, total=10, batch=32):
    return lr_at_step(cfg, epoch, step, steps, total_epochs=total, global_batch_size=batch)


def test_linear_scaling_against_the_reference_batch():
    cfg = OptimConfig(lr=1e-3, lr_scaling="linear", reference_batch_size=32)
    assert base_lr(cfg, 32) == pytest.approx(1e-3) and base_lr(cfg, 256) == pytest.approx(8e-3)
    assert base_lr(cfg, 1024) == pytest.approx(3.2e-2) and base_lr(cfg, 8) == pytest.approx(2.5e-4)
    assert base_lr(OptimConfig(lr=1e-3), 1024) == 1e-3  # lr_scaling none: the batch does not matter


def test_per_step_warmup_table():
    # 4 warm-up steps from lr/10, then StepLR's epoch decay; 3 steps an epoch.
    cfg = OptimConfig(lr=0.8, schedule="step", step_size=2, gamma=0.5, warmup_steps=4)
    table = [(e, s, _lr(cfg, e, s, 3)) for e in range(5) for s in range(3)]
    expected = [
        0.08,
        0.26,
        0.44,  # warm-up: 0.8 x (0.1 + 0.9 k / 4), k = 0, 1, 2
        0.62,
        0.8,
        0.8,  # k = 3 still warming; k = 4 is the full rate
        0.4,
        0.4,
        0.4,
        0.4,
        0.4,
        0.4,
        0.2,
        0.2,
        0.2,
    ]
    assert [round(lr, 12) for _, _, lr in table] == pytest.approx(expected, rel=1e-12)


def test_warmup_epochs_is_per_step_and_agrees_with_the_epoch_function():
    cfg = OptimConfig(lr=0.1, schedule="cosine", warmup_epochs=2)
    rates = [_lr(cfg, e, s, 5) for e in range(10) for s in range(5)]
    assert rates[:10] == sorted(rates[:10]) and len(set(rates[:10])) == 10  # rises every step, not every epoch
    for epoch in range(10):  # each epoch's first step is what lr_at gives the whole epoch
        assert _lr(cfg, epoch, 0, 5) == pytest.approx(lr_at(cfg, epoch, 10), rel=1e-12)
    # Cosine decays continuously over the run's steps.
    after = rates[10:]
    assert after == sorted(after, reverse=True) and len(set(after)) == len(after)


def test_scaled_warmup_reaches_the_scaled_rate():
    cfg = OptimConfig(lr=1e-3, lr_scaling="linear", warmup_steps=10, schedule="constant")
    assert _lr(cfg, 0, 0, 20, batch=512) == pytest.approx(1.6e-3)  # a tenth of 16 x 1e-3
    assert _lr(cfg, 0, 10, 20, batch=512) == pytest.approx(1.6e-2)
    with pytest.raises(ValueError, match="global batch"):
        lr_at(cfg, 0, 10)
    with pytest.raises(ValueError, match="outside"):
        _lr(cfg, 0, 20, 20)
