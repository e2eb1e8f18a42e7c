"""Progressive resizing: each epoch's crop side as a pure function, and both loaders training at it in their own order."""

import dataclasses

import pytest
import torch
from conftest import SAMPLE
from conftest import indexed as _indexed

from flowers_dist import config
from flowers_dist.config import ConfigError, DataConfig
from flowers_dist.data import Placement, build_loader, scan_split
from flowers_dist.data.resolution import at_epoch, sizes

RAMP = DataConfig(image_size=32, progressive_min_size=16, progressive_start_epoch=1, progressive_end_epoch=3)


def test_the_side_ramps_from_the_small_one_to_image_size_rounded_as_ffcv_rounds():
    assert sizes(DataConfig(image_size=32), 4) == [32] * 4  # off: the seed's recipe
    assert sizes(dataclasses.replace(RAMP, progressive_step=8), 5) == [16, 16, 24, 32, 32]
    assert sizes(RAMP, 5) == [16, 16, 32, 32, 32]  # 24 rounds to the nearer multiple of 32
    ffcv = DataConfig(image_size=192, progressive_min_size=160, progressive_start_epoch=2, progressive_end_epoch=13)
    assert sizes(ffcv, 16) == [160] * 8 + [192] * 8  # a ramp as FFCV's rn18 configs: 160 to 192, steps of 32
    odd = DataConfig(image_size=100, progressive_min_size=36, progressive_end_epoch=8)
    assert all(36 <= s <= 100 for s in sizes(odd, 9)) and sizes(odd, 9)[-1] == 100  # rounding stays within the ends
    assert at_epoch(RAMP, 0).image_size == 16 and at_epoch(RAMP, 0).eval_resize == 18 and at_epoch(RAMP, 4) is RAMP


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.progressive_min_size=224"], "data.progressive_min_size.*must be 0 .off. or in \\[16, data.image_size"),
        (["data.progressive_min_size=8"], "data.progressive_min_size"),
        (["data.progressive_min_size=128"], "data.progressive_end_epoch.*must be above"),
        (
            ["data.progressive_min_size=128", "data.progressive_end_epoch=3", "data.progressive_step=0"],
            "progressive_step",
        ),
    ],
)
def test_a_ramp_that_cannot_run_is_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, overrides)


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_each_epoch_trains_at_its_side_in_the_order_a_fixed_side_trains(kind):
    """The side changes the crops only: the order of the files (and DALI's reader, rebuilt at each new side from its
    checkpoint) goes on exactly as without progressive resizing."""
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    split = _indexed(scan_split(SAMPLE / "train"))  # label = file index
    place = Placement(rank=0, world_size=1, device=torch.device("cpu"), workers=1)

    def epochs(cfg):
        loader = build_loader(
            dataclasses.replace(cfg, loader=kind), split, train=True, batch_size=4, placement=place, seed=3
        )
        out = []
        for epoch in range(4):
            loader.set_epoch(epoch)
            batches = [(images.shape[-1], labels.tolist()) for images, labels in loader]
            out.append(({side for side, _ in batches}, [labels for _, labels in batches]))
        return out

    fixed, ramp = epochs(DataConfig(image_size=32)), epochs(dataclasses.replace(RAMP, progressive_step=8))
    assert [sides for sides, _ in ramp] == [{16}, {16}, {24}, {32}]
    assert [order for _, order in ramp] == [order for _, order in fixed]


def test_dali_resumes_mid_epoch_at_the_epochs_side_and_goes_on_exactly():
    """A save in the middle of an epoch at another side than epoch 0's: the resumed loader (built at epoch 0's side,
    rebuilt from the saved reader) yields the rest of that epoch and the next as the run without a stop does."""
    pytest.importorskip("nvidia.dali")
    split = _indexed(scan_split(SAMPLE / "train"))
    place = Placement(rank=0, world_size=1, device=torch.device("cpu"), workers=1)
    cfg = dataclasses.replace(RAMP, loader="dali", progressive_step=8)

    def build(state=None):
        return build_loader(cfg, split, train=True, batch_size=4, placement=place, seed=3, resume_state=state)

    def read(loader, epoch, skip=0, stop=None):
        loader.set_epoch(epoch, skip)
        out = []
        for images, labels in loader:
            out.append((images.shape[-1], labels.tolist(), float(images.sum())))
            if len(out) == stop:
                break
        return out

    straight = build()
    read(straight, 0)
    read(straight, 1)
    whole_2, whole_3 = read(straight, 2), read(straight, 3)
    stopped = build()
    read(stopped, 0)
    read(stopped, 1)
    before = read(stopped, 2, stop=2)
    resumed = build(stopped.resume_state())
    assert before + read(resumed, 2, skip=2) == whole_2 and {side for side, _, _ in whole_2} == {24}
    assert read(resumed, 3) == whole_3 and {side for side, _, _ in whole_3} == {32}
