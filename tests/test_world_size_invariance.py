"""The proof that a config trains to the same weights at any world size: 1 process against 2, and accumulation against processes.

Real runs of the CLI (gloo on the CPU), PyTorch loader (its augmentation is a pure function of
seed, epoch and file, and contract.train_shard gives step k the same files at any split), a few
optimizer steps of the quickstart at 32 px; the weights come from each run's last checkpoint.

How close is close enough. The runs compute the same mathematical function; what differs is the
order of float32 additions: DDP sums two half-batch gradients where one process sums one batch, and
SyncBatchNorm adds two ranks' channel sums. Each such reduction is exact to within a relative
error of about n x eps in the worst case and sqrt(n) x eps typically (eps = 2^-24 = 6e-8; n, the
terms summed, is at most 8 images x 16 x 16 positions = 2048 here): 1e-4 at worst, 3e-6 typically,
per gradient. Over K optimizer steps with momentum 0.9 these per-step errors add (each step's
update carries a sum of up to 1 / (1 - 0.9) = 10 past gradients): K x 10 x 3e-6 = 1.5e-4 for
K = 5, and training amplifies a perturbation of the weights by a factor that, over so few steps at
this rate, stays of order 1-10. Measured against the distance the weights moved from their
initialisation, the runs must therefore agree to within TOL = 2e-3 (10x that estimate's middle), while a
real difference in what is computed (BatchNorm over 4 images instead of 8) changes the gradients
by tens of percent and the weights by a comparable fraction of their movement.
"""

import json

import pytest
import torch
from accelerate.utils import set_seed
from conftest import REPO, TINY, cli, last_checkpoint

from flowers_dist import config
from flowers_dist.model import build_model

pytestmark = pytest.mark.e2e

TOL = 2e-3
STEPS = 5
RUN = [
    "train",
    "--config",
    "configs/quickstart.yaml",
    *TINY,
    "data.loader=torch",
    "train.epochs=1",
    f"train.max_steps_per_epoch={STEPS}",
    "optim.lr=0.01",
    "train.seed=3",
]


def _params(run_dir, names):
    state = last_checkpoint(run_dir)["model"]  # the tensors themselves: the runs agree to a tolerance, not bit for bit
    return torch.cat([state[n].double().flatten() for n in names])


def test_weights_agree_at_any_world_size_with_sync_bn_and_accumulation(tmp_path):
    cfg = config.load(REPO / "configs" / "quickstart.yaml", [*TINY, "train.seed=3"])
    set_seed(cfg.train.seed)  # as train() does before building the model: the runs' common starting point
    model = build_model(cfg.model, 5)
    names = [n for n, _ in model.named_parameters()]  # parameters: DDP leaves BatchNorm's running buffers per rank
    init = torch.cat([p.detach().double().flatten() for p in model.parameters()])

    runs = {
        "1 process, BN over 8": ([], 1),
        "2 processes x 4, sync_bn on (BN over 8)": (["model.sync_bn=on"], 2),
        "2 processes x 4, sync_bn off (BN over 4)": (["model.sync_bn=off"], 2),
        "1 process, 2 accumulation steps x 4 (BN over 4)": (["train.grad_accum_steps=2"], 1),
    }
    weights, logs = {}, {}
    for i, (name, (extra, nprocs)) in enumerate(runs.items()):
        logs[name] = cli([*RUN, *extra, f"train.output_dir={tmp_path}", f"train.name=r{i}"], nprocs=nprocs).stdout
        weights[name] = _params(tmp_path / f"r{i}", names)
    sync_log, local_log, accum_log = list(logs.values())[1:]
    assert "8 = 4 x 2 process(es) x 1 accumulation step(s)" in sync_log
    assert "sync_bn on (model.sync_bn=on; 20 BatchNorm layers synchronised)" in sync_log
    assert "sync_bn off (model.sync_bn=off)" in local_log
    assert "8 = 4 x 1 process(es) x 2 accumulation step(s), 5 steps/epoch" in accum_log
    env = json.loads((tmp_path / "r3" / "environment.json").read_text())
    assert (env["loader"], env["micro_batch_size"], env["grad_accum_steps"], env["sync_bn"]) == ("torch", 4, 2, False)
    one, sync, local, accum = weights.values()
    moved = (one - init).norm()

    def rel(a, b):
        return float((a - b).norm() / moved)

    same_bn_8, same_bn_4, different_bn = rel(sync, one), rel(accum, local), rel(local, one)
    print(
        f"weights moved {float(moved):.4g} from init; relative differences: 1 vs 2 processes with sync_bn "
        f"{same_bn_8:.3g}, 1 process x 2 accumulation vs 2 processes {same_bn_4:.3g}, 1 vs 2 processes "
        f"without sync_bn {different_bn:.3g}"
    )
    assert same_bn_8 < TOL, "2 processes with SyncBatchNorm did not train as 1 process does"
    assert same_bn_4 < TOL, "2 accumulation steps did not train as 2 processes do"
    assert different_bn > 10 * TOL, "without sync_bn the runs should differ far beyond reduction order"
