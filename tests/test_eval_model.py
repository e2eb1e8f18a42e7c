"""Evaluation under torch.compile and DDP runs the bare model, not DDP's forward."""

import torch
import torch.distributed as dist
from accelerate.utils import extract_model_from_parallel
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from flowers_dist.steps import evaluation_model


def test_compiled_ddp_model_is_evaluated_without_ddp(tmp_path, monkeypatch):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        bare = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
        ddp = DDP(bare)
        prepared = torch.compile(
            ddp, backend="eager"
        )  # what Accelerate builds for model.compile with several processes
        calls = []
        forward = DDP.forward
        monkeypatch.setattr(DDP, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
        x = torch.randn(5, 4)
        # The trap: accelerate's unwrap keeps the compiled wrapper, whose forward is still DDP's.
        extract_model_from_parallel(torch.compile(DDP(nn.Linear(4, 3)), backend="eager"))(x)
        assert calls, "the unwrapped compiled model no longer calls DDP's forward: recheck the comment in train.py"
        calls.clear()
        model = evaluation_model(prepared, bare, {"backend": "eager"}).eval()
        out = model(x)
        assert calls == [], "evaluation went through DDP's forward"
        torch.testing.assert_close(out, bare.eval()(x))
        assert prepared._orig_mod is ddp  # training's wrapper untouched
        assert evaluation_model(ddp, bare, {}) is bare  # not compiled: the bare model itself
    finally:
        dist.destroy_process_group()
