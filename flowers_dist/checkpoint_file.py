"""Checkpoint files: written atomically (on a background thread) with a digest of their payload, read back verified.

A file is a header line `flowers-dist-checkpoint 2 sha256=<hex> bytes=<n>` followed by the n
bytes of `torch.save(state)`. Reading checks the length and the digest before unpickling, so
a zero-byte, truncated, corrupted or headerless file is a one-line CheckpointError, never a
traceback from deep inside torch or a model that loads with damaged weights. What goes into
the state, and when it is written, is the CheckpointManager's (checkpointing.py).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .durable import fsync_dir
from .errors import CheckpointError, DiskError

FORMAT = 1
"""Version of the state's layout (the keys inside), stored in the state as "format"."""
FRAMING = 2
"""Version of the file framing (the header line); the first framing, a bare torch.save without a header, is not read."""
MAGIC = f"flowers-dist-checkpoint {FRAMING} ".encode()


def encode(state: dict[str, Any]) -> bytes:
    """The bytes of a checkpoint file holding `state`: header line with length and SHA-256, then the payload."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = MAGIC + f"sha256={hashlib.sha256(payload).hexdigest()} bytes={len(payload)}\n".encode()
    return header + payload


def atomic_save(obj: Any, path: str | Path, *more_paths: str | Path) -> None:
    """Write `obj` once to a temporary name in the same folder, fsync, then give it every name asked for.

    A process killed at any moment leaves, under each final name, either the previous file or the
    new one, never a truncated file. Extra names are hard links to the same bytes (one write for
    last.pt, best.pt and a periodic file). A failed write (e.g. a full disk) raises DiskError
    naming the path and the OS reason, and removes its temporary file; the previous files stay.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, links = _temp_name(path), {Path(extra): _temp_name(Path(extra)) for extra in more_paths}
    data = encode(obj)
    try:
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            for extra, link in links.items():
                link.unlink(missing_ok=True)
                os.link(tmp, link)
                os.replace(link, extra)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
    except OSError as exc:
        for link in links.values():
            link.unlink(missing_ok=True)
        raise DiskError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from exc


def _temp_name(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process and thread (two writers never share one)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def snapshot(obj: Any) -> Any:
    """A copy of a checkpoint state whose tensors are CPU copies: later updates to the live ones do not reach it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class BackgroundWriter:
    """Writes checkpoints on a thread of their own, so training does not wait for the disk.

    `save` copies the state's tensors (the copy is what gets written, whatever the loop does to its
    tensors next), starts the write and returns. At most one write is in flight: the next `save`,
    and `wait`, first let the current one finish, so files land in order and at most one extra copy
    of the state is held. The thread is not a daemon: the interpreter lets it finish before exiting,
    even after an exception in the loop. A failed write is kept and raised by `check` (cheap: the
    loop calls it every step, so a full disk is reported at once), `save` or `wait`.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict[str, Any], paths: list[Path], after=None) -> None:
        """Write `state` to every path; `after()` runs on the writer thread once the files are on disk."""
        self.wait()
        copy = snapshot(state)
        self._thread = threading.Thread(target=self._write, args=(copy, list(paths), after), name="checkpoint-writer")
        self._thread.start()

    def _write(self, state: dict[str, Any], paths: list[Path], after) -> None:
        try:
            atomic_save(state, *paths)
            if after is not None:
                after()
        except BaseException as exc:  # handed to the training thread by check()/wait()
            self._error = exc

    def check(self) -> None:
        """Raise the error of a write that has failed, if any; never blocks."""
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, (DiskError, CheckpointError)):
                raise error
            raise CheckpointError(f"writing a checkpoint failed: {error.__class__.__name__}: {error}") from error

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()


def _header_fields(line: bytes) -> dict[str, str]:
    """The `key=value` fields of a header line that starts with MAGIC (ValueError, UnicodeDecodeError if damaged)."""
    return dict(item.split("=", 1) for item in line[len(MAGIC) :].decode().split())


def header_digest(path: Path) -> str:
    """The payload digest from a checkpoint file's header line: read, not recomputed (the writer hashed it already)."""
    with open(path, "rb") as fh:
        line = fh.readline(512)
    if not line.startswith(MAGIC):
        raise CheckpointError(f"checkpoint {path} has no flowers-dist header")
    return _header_fields(line)["sha256"]


def _read_verified(path: Path) -> bytes:
    """The payload of a checkpoint file after its header, length and digest check."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path} is a folder, not a file") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc.strerror or exc}") from None
    if not data:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its write never completed")
    if not data.startswith(MAGIC):
        raise CheckpointError(
            f"checkpoint {path} is not a flowers-dist checkpoint (no '{MAGIC.decode().strip()}' header)"
        )
    end = data.find(b"\n")
    try:
        fields = _header_fields(data[:end])
        digest, size = fields["sha256"], int(fields["bytes"])
    except (ValueError, KeyError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path} has a damaged header") from None
    payload = data[end + 1 :]
    if len(payload) != size:
        raise CheckpointError(f"checkpoint {path} is truncated ({len(payload)} of {size} bytes)")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 does not match the digest written with it")
    return payload


def load(path: str | Path) -> dict[str, Any]:
    """A verified checkpoint state, or a one-line CheckpointError saying what is wrong with the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    payload = _read_verified(path)
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        first = str(exc).splitlines()[0][:200] if str(exc).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({exc.__class__.__name__}{': ' + first if first else ''})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a flowers-dist checkpoint (state format {FORMAT})")
    return state


def rng_state() -> dict[str, Any]:
    """Every generator the process uses, in types that load with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
