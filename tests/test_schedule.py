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
