"""Exact evaluation: count on each process, sum the counts once, derive every metric from the sums."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data.contract import BatchLoader


class FlipAveraged(nn.Module):
    """The mean of the logits of each image and its mirror image (flip test-time augmentation).

    On the batch tensor (N, C, H, W), so any loader's batches get it: evaluation during training
    (train.eval_hflip_tta), `eval`, `predict` and the mistakes report score alike.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.model(images).float() + self.model(images.flip(3)).float()) / 2


@torch.no_grad()
def local_counts(
    model: nn.Module,
    loader: BatchLoader,
    num_classes: int,
    device: torch.device,
    on_batch: Callable[[], None] | None = None,
    hflip_tta: bool = False,
) -> torch.Tensor:
    """Summed loss, then the confusion matrix (row = true, column = predicted), for this process's shard.

    `on_batch` is called after each batch (the training loop's watchdog heartbeat). `hflip_tta`
    (train.eval_hflip_tta) scores the mean of the logits of each image and of its mirror image.
    Returned as one flat float64 tensor so the caller can sum it over processes in one call;
    float64 keeps counts exact far past any data-set size.
    """
    model.eval()
    scorer = FlipAveraged(model) if hflip_tta else model
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
    for images, labels in loader:
        if labels.numel() == 0:
            continue  # a shard's last batch can be empty; skipping it is safe since nothing here is collective
        logits = scorer(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        # index_add_, not bincount: CUDA's bincount reads the largest index back to the host (a sync per batch).
        cells = labels * num_classes + logits.argmax(1)
        confusion.index_add_(0, cells, torch.ones_like(cells, dtype=torch.float64))
        if on_batch is not None:
            on_batch()
    return torch.cat([loss_sum.view(1), confusion])


@dataclass(frozen=True)
class EvalResult:
    count: int
    correct: int
    loss: float
    confusion: list[list[int]]

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else 0.0

    def per_class_accuracy(self) -> list[float]:
        return [row[i] / sum(row) if sum(row) else 0.0 for i, row in enumerate(self.confusion)]

    @classmethod
    def from_counts(cls, counts: torch.Tensor, num_classes: int) -> EvalResult:
        counts = counts.double().cpu()
        confusion = counts[1:].round().long().view(num_classes, num_classes)
        count = int(confusion.sum())
        return cls(
            count=count,
            correct=int(confusion.diagonal().sum()),
            loss=float(counts[0]) / count if count else float("nan"),
            confusion=confusion.tolist(),
        )

    def to_dict(self, classes: list[str]) -> dict:
        return {
            "count": self.count,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "per_class_accuracy": dict(zip(classes, self.per_class_accuracy())),
            "confusion": self.confusion,
            "classes": classes,
        }

    def format(self, classes: list[str]) -> str:
        width = max(10, *(len(c) for c in classes))
        lines = [
            f"accuracy {self.accuracy:.4f} ({self.correct}/{self.count}), loss {self.loss:.4f}",
            "",
            "per-class accuracy:",
        ]
        for name, acc, row in zip(classes, self.per_class_accuracy(), self.confusion):
            lines.append(f"  {name:<{width}} {acc:.4f}  ({row[classes.index(name)]}/{sum(row)})")
        lines += ["", "confusion matrix (rows = true class, columns = predicted):"]
        lines.append(" " * (width + 2) + "".join(f"{c[:8]:>9}" for c in classes))
        for name, row in zip(classes, self.confusion):
            lines.append(f"  {name:<{width}}" + "".join(f"{v:>9}" for v in row))
        return "\n".join(lines)
