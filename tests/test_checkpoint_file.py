"""Checkpoint files as this version writes them, and the one-line refusal of any file it did not write."""

import io

import pytest
import torch

from flowers_dist import checkpoint_file
from flowers_dist.errors import CheckpointError


def test_a_written_file_reads_back_and_names_its_framing(tmp_path):
    state = {"format": checkpoint_file.FORMAT, "model": {"w": torch.arange(4.0)}}
    checkpoint_file.atomic_save(state, tmp_path / "last.pt")
    assert (
        (tmp_path / "last.pt")
        .read_bytes()
        .startswith(f"flowers-dist-checkpoint {checkpoint_file.FRAMING} sha256=".encode())
    )
    assert torch.equal(checkpoint_file.load(tmp_path / "last.pt")["model"]["w"], torch.arange(4.0))


def test_a_headerless_file_fails_verification_in_one_line(tmp_path):
    """A bare torch.save, even of a well-formed state, is not a file this version wrote: no fallback reads it."""
    buffer = io.BytesIO()
    torch.save({"format": checkpoint_file.FORMAT, "model": {}}, buffer)
    (tmp_path / "old.pt").write_bytes(buffer.getvalue())
    with pytest.raises(
        CheckpointError,
        match=r"^checkpoint .*old.pt is not a flowers-dist checkpoint "
        r"\(no 'flowers-dist-checkpoint 2' header\)$",
    ):
        checkpoint_file.load(tmp_path / "old.pt")


def test_another_state_format_is_refused(tmp_path):
    checkpoint_file.atomic_save({"format": checkpoint_file.FORMAT + 1}, tmp_path / "next.pt")
    with pytest.raises(
        CheckpointError, match=rf"is not a flowers-dist checkpoint \(state format {checkpoint_file.FORMAT}\)$"
    ):
        checkpoint_file.load(tmp_path / "next.pt")
