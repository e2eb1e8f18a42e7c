"""Exact evaluation on known predictions: the counts, the loss and the confusion matrix by hand, over 1 and 2 shards."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowers_dist.evaluate import EvalResult, local_counts

CLASSES = 3


class FirstColumns(nn.Module):
    """A 'model' whose logits are its input's first columns: predictions the test chooses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :CLASSES]


def _batches(logits: torch.Tensor, labels: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(logits[i : i + size], labels[i : i + size]) for i in range(0, len(labels), size)]


def test_counts_loss_and_confusion_match_a_count_by_hand():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(11, CLASSES, generator=generator)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    predicted = logits.argmax(1)
    expected = [[0] * CLASSES for _ in range(CLASSES)]
    for t, p in zip(labels.tolist(), predicted.tolist()):
        expected[t][p] += 1  # row = true class, column = predicted

    # One process: batches of 4 (the last holds 3), and an empty batch as a shard's padded tail.
    loader = _batches(logits, labels, 4) + [(logits[:0], labels[:0])]
    one = EvalResult.from_counts(local_counts(FirstColumns(), loader, CLASSES, torch.device("cpu")), CLASSES)
    assert one.count == 11 and one.confusion == expected
    assert one.correct == int((predicted == labels).sum())
    assert one.loss == pytest.approx(F.cross_entropy(logits.double(), labels).item(), rel=1e-6)
    assert one.per_class_accuracy() == [expected[i][i] / sum(expected[i]) for i in range(CLASSES)]

    # Two processes, each with every other sample, summed once: the same numbers.
    shards = [
        local_counts(FirstColumns(), _batches(logits[r::2], labels[r::2], 4), CLASSES, torch.device("cpu"))
        for r in (0, 1)
    ]
    two = EvalResult.from_counts(shards[0] + shards[1], CLASSES)
    assert (two.count, two.correct, two.confusion) == (one.count, one.correct, one.confusion)
    assert two.loss == pytest.approx(one.loss, rel=1e-6)  # float32 losses summed in another order
