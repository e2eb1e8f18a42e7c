"""SyncBatchNorm on 2 real gloo processes against torch's BatchNorm over the concatenated batch."""

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from flowers_dist.sync_bn import AUTO_BELOW, SyncBatchNorm, convert, wanted

# Uneven shares (3 and 5 images): the statistics must weight each rank by its count, not average means.
ROWS = {0: slice(0, 3), 1: slice(3, 8)}
STEPS = 3


def _inputs(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    # A mean offset of a few standard deviations per channel, as activations after a ReLU have.
    x = torch.randn(8, 6, 5, 4, generator=g) * torch.linspace(0.5, 2.0, 6).view(1, 6, 1, 1) + torch.linspace(
        -3, 3, 6
    ).view(1, 6, 1, 1)
    w = torch.randn(8, 6, 5, 4, generator=g)  # the loss weights: sum(y * w) has a non-zero gradient, sum(y) has none
    return x, w


def _bn(cls) -> nn.Module:
    torch.manual_seed(7)
    bn = cls(6, momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def _run(bn: nn.Module, rows: slice, reduce_grads) -> dict:
    out = {"y": [], "x_grad": [], "w_grad": [], "b_grad": []}
    for step in range(STEPS):
        x, w = _inputs(step)
        x = x[rows].clone().requires_grad_(True)
        bn.zero_grad()
        y = bn(x)
        (y * w[rows]).sum().backward()
        reduce_grads(bn)
        out["y"].append(y.detach())
        out["x_grad"].append(x.grad)
        out["w_grad"].append(bn.weight.grad.clone())
        out["b_grad"].append(bn.bias.grad.clone())
    out.update(
        running_mean=bn.running_mean.clone(), running_var=bn.running_var.clone(), batches=int(bn.num_batches_tracked)
    )
    bn.eval()
    out["eval_y"] = bn(_inputs(99)[0][rows]).detach()
    return out


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:

        def all_reduce_grads(bn):  # what DDP does to parameter gradients
            for p in bn.parameters():
                dist.all_reduce(p.grad)

        torch.save(_run(_bn(SyncBatchNorm), ROWS[rank], all_reduce_grads), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
def test_two_gloo_processes_match_batchnorm_on_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ref = _run(_bn(nn.BatchNorm2d), slice(0, 8), lambda bn: None)
    close = dict(rtol=1e-5, atol=1e-5)
    for step in range(STEPS):
        for key in ("y", "x_grad"):  # per image: each rank holds its rows of the reference
            got = torch.cat([ranks[r][key][step] for r in range(2)])
            torch.testing.assert_close(got, ref[key][step], **close, msg=f"{key} at step {step}")
        for key in ("w_grad", "b_grad"):  # after the all-reduce, both ranks hold the full batch's gradient
            for r in range(2):
                torch.testing.assert_close(
                    ranks[r][key][step], ref[key][step], **close, msg=f"{key} rank {r} step {step}"
                )
    for r in range(2):
        torch.testing.assert_close(ranks[r]["running_mean"], ref["running_mean"], **close)
        torch.testing.assert_close(ranks[r]["running_var"], ref["running_var"], **close)
        assert ranks[r]["batches"] == STEPS
    # Evaluation uses the running statistics: plain BatchNorm, no collective.
    torch.testing.assert_close(torch.cat([ranks[r]["eval_y"] for r in range(2)]), ref["eval_y"], **close)
    # And the test can tell: each rank's own BatchNorm gives a visibly different output.
    local = _run(_bn(nn.BatchNorm2d), ROWS[0], lambda bn: None)
    assert (local["y"][0] - ref["y"][0][ROWS[0]]).abs().max() > 0.1


def test_convert_keeps_parameters_buffers_and_state_dict_keys():
    model = timm.create_model("resnet18", pretrained=False, num_classes=5)
    before = model.state_dict()
    bn1_weight = model.bn1.weight
    model, replaced = convert(model)
    assert replaced == 20  # resnet18: the stem, two per basic block (8 blocks), one per downsample (3)
    assert isinstance(model.bn1, SyncBatchNorm) and model.bn1.weight is bn1_weight
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before)  # checkpoints load either way
    assert all(torch.equal(after[k], before[k]) for k in before)
    # Alone (no process group), training and evaluation are plain BatchNorm's.
    x = torch.randn(4, 3, 32, 32)
    plain = timm.create_model("resnet18", pretrained=False, num_classes=5)
    plain.load_state_dict(before)
    torch.testing.assert_close(model(x), plain(x))


def test_auto_rule():
    assert wanted("auto", 4, 8)[0] and wanted("auto", AUTO_BELOW - 1, 2)[0]
    assert not wanted("auto", AUTO_BELOW, 2)[0] and not wanted("auto", 32, 8)[0]
    assert not wanted("on", 2, 1)[0]  # one process: nothing to synchronise
    assert wanted("on", 64, 2)[0] and not wanted("off", 1, 8)[0]
    assert "4 images per process < 16" in wanted("auto", 4, 8)[1]
