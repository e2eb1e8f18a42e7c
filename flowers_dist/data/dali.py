"""The DALI loader: JPEG decoding and augmentation in a DALI pipeline, behind the loader contract.

On a GPU host the JPEGs are decoded by nvJPEG (`mixed`) and augmented on the GPU; elsewhere the
same graph runs on DALI's CPU operators, except that its last steps (rotation, colour jitter, flip
and normalisation) run as one compiled pass per image (dali_fused.py) that computes what DALI's
operators compute, from the same random draws, in a fraction of their CPU time.

Sharding is DALI's own: the file reader takes shard `rank` of `world_size` of a permutation of
the whole list that is the same on every rank and changes after every epoch; every rank then
yields the micro-batches of `num_files // global_batch` full optimizer steps per epoch, as
`train_shard` does, so no rank waits for another in the all-reduce. Gradient accumulation
changes only that count: the same pipeline and reader state serve every epoch.

Differences from the PyTorch loader, by design:
- The epoch order is the reader's own sequence of permutations, applied to the file list
  permuted by `train.seed` (DALI seeds shuffle_after_epoch with a constant plus the epoch, so
  its `seed` cannot change the order; measured); `set_epoch` only records the epoch. To
  resume exactly, the loop saves each rank's DALI checkpoint (`resume_state()`, reader
  position and random generators) with the run and rebuilds the pipeline from it; a resume on a different number of processes starts afresh.
- Augmentation is drawn per rank (pipeline seed from seed and rank), not per file.
- A file DALI cannot decode would stop the run; the data check before training and evaluation
  (data/usable.py) leaves such files out, so only data.check=false, or a file changed after the
  check, meets the one-line DataError that names the suspects.
- train.max_steps_per_epoch (smoke runs) builds, each epoch, a pipeline over just the files of
  that epoch's first max_steps batches, in `train_shard`'s order (as the PyTorch loader takes
  them), instead of decoding the rest of DALI's epoch: see `_CutEpochs`. Such epochs are
  functions of the epoch: a mid-epoch resume rebuilds the epoch and skips what was trained.

Every batch is torch's own memory (`exec_dynamic=False`, see `OWN_THE_BATCH`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.data_node import DataNode
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from ..config import DataConfig
from .contract import Placement, ReaderState, rest_of_epoch, train_shard
from .folder import DataError, Split
from .resolution import at_epoch, train_size
from .shards import LABEL_EXT, Sample, SampleReader

log = logging.getLogger(__name__)

READER = "Reader"
OUTPUTS = ["images", "labels"]

# Why every pipeline runs on DALI's classic executor (read in DALI 2.4's sources):
# - With exec_dynamic (DALI's default since 1.44) DALIGenericIterator hands out zero-copy views
#   (torch.from_dlpack). Reading is ordered: __dlpack__ makes torch's stream wait on the batch's
#   ready event. Freeing is not: the capsule holds DALI's buffer, allocated with
#   alloc_raw_async_shared(..., stream, stream), i.e. freed in DALI's stream order. When the
#   loop drops a batch (the next `for` iteration) the GPU may still be reading it (backward
#   reads the input images); DALI's pool can hand the block to its next output at once
#   (DALI's own AsyncDevShared test expects the same pointer back) and overwrite it while
#   torch's kernels read it: silent corruption, never an error.
# - With exec_dynamic=False the iterator copies every output into a fresh torch tensor on
#   torch's current stream (feed_ndarray -> copy_to_external, non_blocking), and DALI's stream
#   then waits for that copy (CopyToExternalImplGPU: wait_order.wait(copy_order)) before it
#   reuses the buffer. The batch is then torch's memory, freed by torch's caching allocator in
#   torch's stream order: safe by construction, for any consumer.
# Cost: one device-to-device copy per batch (a 256 x 3 x 224 x 224 float32 batch is 154 MB, a
# few tens of microseconds at HBM bandwidth); on the CPU a memcpy on the consumer's thread while
# DALI's threads decode the next batches. One executor everywhere keeps the CPU tests on the
# GPU's code path. launch/gpu_check.py's delayed-read check tests the hazard on a GPU.
OWN_THE_BATCH = dict(exec_dynamic=False)


def _reader(
    files: list[str],
    labels: list[int],
    shard_id: int,
    num_shards: int,
    shuffle: bool,
    reader_seed: int,
    shards: tuple[list[str], list[str]] | None = None,
    samples: tuple[Sample, ...] | None = None,
):
    """The encoded images and their labels: from files, from a pack's shards, or (cut epochs of a pack) listed samples."""
    if samples is not None:
        return _listed_samples(samples)
    if shards is not None:
        return _webdataset(*shards, shard_id, num_shards, shuffle, reader_seed)
    # pad_last_batch gives every shard the same number of batches (the last ones padded with a
    # repeated sample) and, read with the iterator's PARTIAL policy, ends each epoch exactly at
    # a shard boundary: every file once per epoch over all ranks. shuffle_after_epoch permutes
    # the whole list identically on every rank, so shards never overlap; without shuffling,
    # each rank keeps its shard. (DROP without padding drifts across epochs: files repeat
    # within an epoch on many shard and batch sizes; seen.)
    if shuffle:
        # shuffle_after_epoch draws the same permutations of list positions whatever the reader's
        # seed (measured on DALI 2.4: each epoch's order is a fixed permutation of the list given).
        # Permuting the list itself by the seed, identically on every rank, makes the order follow it.
        order = list(range(len(files)))
        random.Random(reader_seed).shuffle(order)
        files, labels = [files[i] for i in order], [labels[i] for i in order]
    return fn.readers.file(
        files=files,
        labels=labels,
        shard_id=shard_id,
        num_shards=num_shards,
        shuffle_after_epoch=shuffle,
        random_shuffle=False,
        seed=reader_seed,
        pad_last_batch=True,
        stick_to_shard=not shuffle,
        name=READER,
    )


def encoded_in_order(split: Split):
    """The encoded images of a split, read once in order on one process: the reader of decode-only ceilings.

    For use inside a pipeline definition; a pack is read from its shards by DALI's own reader.
    """
    if split.packed:
        jpegs, _ = _webdataset(*_pack_shards(split), 0, 1, False, 0)
        return jpegs
    jpegs, _ = fn.readers.file(files=[str(f) for f in split.files], name=READER)
    return jpegs


def _webdataset(tars: list[str], indexes: list[str], shard_id: int, num_shards: int, shuffle: bool, reader_seed: int):
    # DALI shards the samples of all tars, in pack order, by count (the index files give the
    # counts); pad_last_batch and PARTIAL end every epoch at a shard boundary, as for files.
    # Training reshuffles the order of the tars after each epoch, with the same seed on every
    # rank (so the ranks' parts stay disjoint), and shuffles samples in a buffer: the pack
    # interleaves the classes, so the buffer need not span classes (NVIDIA/DALI#5429).
    jpegs, cls = fn.readers.webdataset(
        paths=tars,
        index_paths=indexes,
        ext=["jpg;jpeg;png", LABEL_EXT],
        missing_component_behavior="error",
        shard_id=shard_id,
        num_shards=num_shards,
        pad_last_batch=True,
        random_shuffle=shuffle,
        **({"shuffle_after_epoch": True, "shuffle_after_epoch_seed": reader_seed % 2**31} if shuffle else {}),
        stick_to_shard=not shuffle,
        # Plain reads, not a mapping held for the pipeline's life: mapped pages cannot be evicted
        # (a cold `bench loader` would read warm), and DALI advises against mmap on network file systems.
        dont_use_mmap=True,
        name=READER,
    )
    return jpegs, _ascii_int(cls)


def _ascii_int(digits, width: int = 9):
    """A label stored as ASCII digits (a `.cls` member), as an int32, in graph arithmetic (Horner's rule)."""
    n = fn.cast(digits.shape()[0], dtype=types.INT32)
    d = fn.cast(fn.pad(digits, fill_value=ord("0"), shape=[width]), dtype=types.INT32) - ord("0")
    value = d[0]
    for i in range(1, width):
        value = value + (n > i) * (value * 9 + d[i])  # 10 * value + digit while digits remain
    return fn.cast(value, dtype=types.INT32)


def _listed_samples(samples: tuple[Sample, ...]):
    """Samples read from their shards in the order listed, one epoch (`_CutEpochs` over a pack)."""
    reader = SampleReader()

    def read(info):
        if info.idx_in_epoch >= len(samples):
            raise StopIteration
        s = samples[info.idx_in_epoch]
        return np.frombuffer(reader.read(s), dtype=np.uint8), np.array(s.label, dtype=np.int32)

    return fn.external_source(source=read, num_outputs=2, batch=False, dtype=[types.UINT8, types.INT32])


def _mixed_decoder(cfg: DataConfig) -> dict:
    """Arguments of a `mixed` (GPU) decoder: hw_decoder_load only when the config sets it."""
    if cfg.hw_decoder_load < 0:
        return dict(device="mixed")
    return dict(device="mixed", hw_decoder_load=cfg.hw_decoder_load)


def _normalize(images, cfg: DataConfig, mirror, dtype: torch.dtype, channels_last: bool):
    # DALI has no bfloat16: it emits float32 and the loader casts on the device.
    out_type = types.FLOAT16 if dtype == torch.float16 else types.FLOAT
    return fn.crop_mirror_normalize(
        images,
        mirror=mirror,
        mean=[m * 255 for m in cfg.mean],
        std=[s * 255 for s in cfg.std],
        dtype=out_type,
        output_layout="HWC" if channels_last else "CHW",
    )


def _augment_draws(cfg: DataConfig):
    """The per-sample random draws of the training augmentation: angle, brightness, contrast, saturation, flip.

    None for a step the recipe turns off. Both finishes below consume the same draws.
    """
    angle = fn.random.uniform(range=(-cfg.rotation, cfg.rotation)) if cfg.rotation > 0 else None
    colour = None
    if cfg.color_jitter > 0:
        factor = (1 - cfg.color_jitter, 1 + cfg.color_jitter)
        colour = tuple(fn.random.uniform(range=factor) for _ in range(3))
    mirror = fn.random.coin_flip(probability=cfg.hflip)
    return angle, colour, mirror


def _finish_with_dali_ops(images, draws, cfg: DataConfig, dtype: torch.dtype, channels_last: bool):
    """Rotation, colour jitter, flip and normalisation with DALI's operators (the GPU graph's finish)."""
    angle, colour, mirror = draws
    # torchvision flips before rotating; the flip is applied last here (fused into the normalise)
    # which gives the same distribution because the angle's range is symmetric.
    if angle is not None:
        # Nearest neighbour, as torchvision's RandomRotation does by default; linear cost twice
        # the time of the whole rest of the CPU graph (measured).
        images = fn.rotate(images, angle=angle, keep_size=True, fill_value=0, interp_type=types.INTERP_NN)
    if colour is not None:
        # One fixed order and a contrast pivot at mid-grey, where torchvision shuffles the order
        # and pivots on each image's mean grey: the same ranges, slightly different draws.
        brightness, contrast, saturation = colour
        images = fn.color_twist(images, brightness=brightness, contrast=contrast, saturation=saturation)
    return _normalize(images, cfg, mirror, dtype, channels_last)


def _finish_fused(images, draws, cfg: DataConfig, dtype: torch.dtype, channels_last: bool):
    """The same finish in one compiled pass per image (dali_fused), for the CPU graph."""
    from . import dali_fused

    angle, colour, mirror = draws
    params = [
        angle if angle is not None else 0.0,
        *(colour if colour is not None else (1.0, 1.0, 1.0)),
        fn.cast(mirror, dtype=types.FLOAT),
        *[m * 255 for m in cfg.mean],
        *[1 / (s * 255) for s in cfg.std],
    ]
    assert len(params) == dali_fused.NUM_PARAMS
    params = fn.stack(*[p if isinstance(p, DataNode) else types.Constant(p, dtype=types.FLOAT) for p in params])
    images = dali_fused.finish_operator(channels_last)(images, params)
    return fn.cast(images, dtype=types.FLOAT16) if dtype == torch.float16 else images


@pipeline_def
def train_pipeline(
    files: list[str],
    labels: list[int],
    cfg: DataConfig,
    shard_id: int,
    num_shards: int,
    reader_seed: int,
    on_gpu: bool,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    debug: bool = False,
    fused: bool = False,
    shuffle: bool = True,
    shards: tuple[list[str], list[str]] | None = None,
    samples: tuple[Sample, ...] | None = None,
    keys: bool = False,
):
    """Random-resized crop, flip, optional rotation and colour jitter, normalise.

    shuffle=False reads the files in the order given (the per-epoch lists of `_CutEpochs`).

    fused=True (CPU only) ends the graph with dali_fused's one-pass kernel instead of DALI's
    rotate, color_twist and crop_mirror_normalize: the same augmentation from the same draws.
    With debug=True the pipeline also returns, per sample, the encoded image's shape, the
    crop's shape and the flip decision: the production graph, with its internals exposed.
    """
    if fused and on_gpu:
        raise ValueError("the fused finish is a CPU kernel; the GPU graph uses DALI's operators")
    jpegs, label = _reader(files, labels, shard_id, num_shards, shuffle, reader_seed, shards, samples)
    # ROI decoding: only the random crop window of each JPEG is decoded.
    # nvJPEG's default buffer padding (16 MB device, 8 MB host per thread) already holds these
    # photos; NVIDIA's ImageNet example pads 211/141 MB per thread, gigabytes at 16 threads.
    decoder = _mixed_decoder(cfg) if on_gpu else dict(device="cpu")
    crops = fn.decoders.image_random_crop(
        jpegs,
        output_type=types.RGB,
        random_area=list(cfg.scale),
        random_aspect_ratio=list(cfg.ratio),
        num_attempts=10,
        **decoder,
    )
    images = fn.resize(
        crops, resize_x=cfg.image_size, resize_y=cfg.image_size, interp_type=types.INTERP_LINEAR, antialias=True
    )
    draws = _augment_draws(cfg)
    finish = _finish_fused if fused else _finish_with_dali_ops
    images = finish(images, draws, cfg, dtype, channels_last)
    if on_gpu:
        label = label.gpu()
    if debug:
        return images, label, fn.peek_image_shape(jpegs), crops.shape(), draws[2]
    if keys:  # train.record_samples: where each sample came from (a file's path; a shard, offset and key)
        return images, label, fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0)
    return images, label


def _round_half_even_half(d):
    """round(d / 2) for integer d >= 0, with Python's ties-to-even, in integer graph arithmetic."""
    half = d // 2
    return half + (d % 2) * (half % 2)


def _eval_geometry(jpegs, cfg: DataConfig):
    """torchvision's Resize(eval_resize) output size and CenterCrop(image_size) anchor, per sample.

    Matching torchvision's integer rounding (long side truncated, anchor rounded half to even)
    keeps DALI's evaluation pixel-aligned with the PyTorch loader; a one-pixel shift alone
    moved small crops by 0.25 in normalised units.
    """
    shape = fn.peek_image_shape(jpegs)  # H, W, C as decoded (EXIF orientation applied)
    h, w = shape[0], shape[1]
    size, crop = cfg.eval_resize, cfg.image_size
    new_long = size * dmath.max(h, w) // dmath.min(h, w)
    new_h = size + (w <= h) * (new_long - size)
    new_w = size + (w > h) * (new_long - size)
    anchor = fn.stack(_round_half_even_half(new_h - crop), _round_half_even_half(new_w - crop))
    return fn.cast(new_h, dtype=types.FLOAT), fn.cast(new_w, dtype=types.FLOAT), fn.cast(anchor, dtype=types.INT32)


@pipeline_def
def val_pipeline(
    files: list[str],
    labels: list[int],
    cfg: DataConfig,
    shard_id: int,
    num_shards: int,
    on_gpu: bool,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    shards: tuple[list[str], list[str]] | None = None,
):
    """Resize the shorter side to cfg.eval_resize, centre-crop image_size, normalise."""
    jpegs, label = _reader(files, labels, shard_id, num_shards, False, 0, shards)
    # Fancy upsampling makes nvJPEG's chroma match libjpeg-turbo (and PIL), so evaluation on
    # the GPU agrees with the CPU and PyTorch paths.
    decoder = dict(_mixed_decoder(cfg), jpeg_fancy_upsampling=True) if on_gpu else dict(device="cpu")
    images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
    new_h, new_w, anchor = _eval_geometry(jpegs, cfg)
    images = fn.resize(images, resize_y=new_h, resize_x=new_w, interp_type=types.INTERP_LINEAR, antialias=True)
    images = fn.slice(images, start=anchor, shape=[cfg.image_size, cfg.image_size], axes=[0, 1])
    images = _normalize(images, cfg, 0, dtype, channels_last)
    if on_gpu:
        label = label.gpu()
    return images, label


class _CutEpochs:
    """Training pipelines for train.max_steps_per_epoch: each epoch's reader holds just that epoch's first `steps` batches.

    Draining DALI's epoch after a cut decodes every remaining file (a 5-step smoke run on the
    full set paid full epochs). Instead each epoch gets its own pipeline over this rank's files
    of the first `steps` batches of `train_shard`'s permutation (the order the PyTorch loader
    takes), read in that order, so DALI's epoch ends with the cut and nothing is drained. The
    order and the augmentation seed are functions of (seed, rank, epoch): a run resumes at an
    epoch boundary with no saved state. Costs one pipeline build per epoch.
    """

    def __init__(
        self,
        make_pipeline: Callable[[list[int], int], object],
        num_files: int,
        batch: int,
        rank: int,
        world: int,
        seed: int,
        steps: int,
        accum: int = 1,
    ):
        self.make_pipeline, self.num_files, self.batch = make_pipeline, num_files, batch
        self.rank, self.world, self.seed, self.steps, self.accum = rank, world, seed, steps, accum

    def files(self, epoch: int) -> list[int]:
        """Indices of this rank's files of the epoch, in reading order."""
        batches = train_shard(self.num_files, self.batch, self.rank, self.world, self.seed, epoch, self.accum)[
            : self.steps
        ]
        return [i for b in batches for i in b]

    def pipeline(self, epoch: int):
        return self.make_pipeline(self.files(epoch), epoch)


class _RestOfEpoch:
    """A mid-epoch resume with no reader position for this rank: the rest of the epoch, read as a cut epoch is.

    DALI's reader state is per rank, over its own shard of the data: a run saved on 2 processes
    and resumed on 1 or 4 has none to continue from. What every saved rank trained of the epoch
    is in the checkpoint (`contract.ReaderState.trained`); the samples not yet trained are dealt
    in the epoch's global order (`contract.rest_of_epoch`, the same on every new rank) and read
    in that order through a pipeline of just those files, as `_CutEpochs` reads a cut epoch. The
    next epoch is the reader's again (the reader then starts its own order, at this world size).
    """

    def __init__(
        self,
        make_pipeline: Callable[[list[int], int], object],
        names: list[str],
        trained: set[str],
        batch: int,
        placement: Placement,
        seed: int,
        accum: int,
    ):
        self.make_pipeline, self.names, self.trained = make_pipeline, names, trained
        self.batch, self.placement, self.seed, self.accum = batch, placement, seed, accum

    def files(self, epoch: int, micro_batches_left: int) -> list[int]:
        p = self.placement
        batches = rest_of_epoch(
            self.names,
            self.trained,
            micro_batches_left // self.accum,
            self.batch,
            p.rank,
            p.world_size,
            self.seed,
            epoch,
            self.accum,
        )
        return [i for b in batches for i in b]


class DaliLoader:
    """A DALIGenericIterator behind the loader contract (not for accelerator.prepare).

    Training yields `steps` full batches per epoch and then reads DALI's epoch to its end
    (the tail and padding, at most a batch or two): DALI ignores reset() mid-epoch, and
    finishing the epoch keeps every rank's reader at the start of the next permutation. With
    max_steps_per_epoch, `cut` builds a pipeline per epoch that holds only the files it yields,
    so there is nothing to drain. Evaluation yields every batch; a rank's last can be empty.
    """

    kind = "dali"

    def __init__(
        self,
        pipeline,
        *,
        train: bool,
        steps: int,
        num_samples: int,
        placement: Placement,
        split: Split,
        restored: bool = False,
        cut: _CutEpochs | None = None,
        keys: bool = False,
        rest: _RestOfEpoch | None = None,
        reader: Callable[[str | None, int], object] | None = None,
        carried: list[str] | None = None,
        size_of: Callable[[int], int] | None = None,
    ):
        self.train, self.num_samples, self.placement, self.split = train, num_samples, placement, split
        self.epoch, self.skip = 0, 0
        self._outputs = [*OUTPUTS, "keys"] if keys else OUTPUTS
        self._keys: list[str] = []  # the names of the samples handed out since set_epoch (from source_info)
        self._yielded = 0
        self._mid_epoch = False
        self._restored = restored  # built from a saved state: the reader already stands where `skip` says
        self._cut = cut
        self._rest, self._rest_files = rest, None  # a resume with no reader position: the epoch's rest, listed
        self._reader = reader  # builds the reader's pipeline when a rest epoch is over
        self._carried = carried or []  # the resumed epoch's samples trained before the resume, kept in saves
        # Progressive resizing: the epoch's crop side (resolution.train_size) and the side the reader's pipeline has.
        self._size_of = size_of
        self._reader_size = size_of(0) if size_of is not None and pipeline is not None else None
        self._iterator_epoch = None if pipeline is None else 0  # the epoch self.iterator was built for, unread
        self.iterator = None if pipeline is None else self._make_iterator(pipeline)
        self.steps = steps if train else len(self.iterator)

    def _make_iterator(self, pipeline, listed: bool = False) -> DALIGenericIterator:
        try:  # the iterator already runs the pipeline for its first batch
            # A pack's listed samples (cut epochs, the rest of an epoch) come from an external source,
            # which ends the epoch itself.
            reader = None if (listed or self._cut is not None) and self.split.packed else READER
            outputs = OUTPUTS if listed else self._outputs  # a listed pipeline names its samples by its list
            return DALIGenericIterator(
                pipeline, outputs, reader_name=reader, last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True
            )
        except RuntimeError as exc:
            raise self._decode_error(exc) from None

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Record the epoch; the order is the reader's next permutation (see the module docstring).

        skip > 0 (a mid-epoch resume): a loader restored from that point's state yields the
        epoch's remaining batches; one built without it (another world size) reads and drops
        `skip` batches first, which resumes the data order only approximately.
        """
        self.epoch, self.skip = epoch, skip
        self._keys, self._yielded = [], 0
        if self._rest_files is not None:  # the rest of the resumed epoch was trained: the reader's turn
            self._rest = self._rest_files = None
        if skip == 0:
            self._carried = []

    def trained(self) -> list[str]:
        """Listed epochs (cut, or a resumed epoch's rest): from the list; the reader's: from each sample's source_info."""
        if self._cut is not None:
            batch = self._cut.batch
            files = self._cut.files(self.epoch)[self.skip * batch : (self.skip + self._yielded) * batch]
            return [self.split.name(i) for i in files]
        if self._rest_files is not None:
            return [self.split.name(i) for i in self._rest_files[: self._yielded * self._rest.batch]]
        return list(self._keys)

    def resume_state(self) -> ReaderState | None:
        """Where this rank stands: DALI's checkpoint of reader and random generators, and what it trained of the epoch.

        DALI's iterator accounts for the batches it has prefetched but not yet returned, so a
        pipeline rebuilt from `reader` yields the next batch the consumer has not seen (the same
        world size). `trained` (empty at an epoch's end) lets a resume at another world size train
        exactly the rest of the epoch. No reader while the rest of a resumed epoch is read, which
        has none. None for cut epochs, which are functions of the epoch.
        """
        if not self.train or self._cut is not None:
            return None
        reader = None if self._rest_files is not None or self.iterator is None else self.iterator.checkpoints()[0]
        done = self._yielded == self.steps - self.skip
        return ReaderState(reader=reader, trained=[] if done else self._carried + self.trained())

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._cut is not None:
            yield from self._cut_epoch()
            return
        if self._rest is not None:
            yield from self._rest_epoch()
            return
        if self.iterator is None:  # after a resumed epoch's rest: the reader, from its own first epoch
            self._build_reader(None)
        self._drain()  # a consumer that stopped early left DALI mid-epoch
        self._resize_reader()
        self._mid_epoch = True
        skip, self.skip = self.skip, 0
        if skip and not self._restored:
            for _ in range(skip):
                self._next()
        self._restored = False
        for _ in range(skip, self.steps):
            batch = self._next()
            if batch is None:
                raise RuntimeError(f"DALI's epoch ended after fewer than {self.steps} batches")
            self._yielded += 1
            yield self._convert(batch)
        self._drain()

    def _resize_reader(self) -> None:
        """Progressive resizing: an epoch of another crop side gets the reader's pipeline rebuilt at that side.

        The crop side is fixed when a DALI graph is built, so the new pipeline starts from the old
        one's checkpoint: the reader's permutations and the random streams go on exactly where they
        stood, as on a resume. Costs one pipeline build per change of side (a handful a run).
        """
        if self._size_of is None or self._size_of(self.epoch) == self._reader_size:
            return
        self._build_reader(self.iterator.checkpoints()[0])

    def _build_reader(self, checkpoint: str | None) -> None:
        """The reader's pipeline at this epoch's side, from `checkpoint` (None: the reader's own start)."""
        self.iterator = None  # the old pipeline goes before the new one takes threads and memory
        self.iterator = self._make_iterator(_built(self._reader(checkpoint, self.epoch), self.split))
        self._reader_size = self._size_of(self.epoch)

    def _cut_epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._iterator_epoch != self.epoch:
            self.iterator = None  # the last epoch's pipeline goes before the next one takes threads and memory
            self.iterator = self._make_iterator(_built(self._cut.pipeline(self.epoch), self.split))
        self._iterator_epoch = None  # read from now on: the next __iter__ builds afresh
        skip, self.skip = self.skip, 0
        for step in range(self.steps):
            batch = self._next()
            if (
                step < skip
            ):  # a mid-epoch resume: the epoch is a function of the epoch, the first `skip` batches were trained
                continue
            if batch is None:
                raise RuntimeError(f"DALI's epoch ended after fewer than {self.steps} batches")
            self._yielded += 1
            yield self._convert(batch)

    def _rest_epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._rest_files is None:
            self._rest_files = self._rest.files(self.epoch, self.steps - self.skip)
            self.iterator = self._make_iterator(
                _built(self._rest.make_pipeline(self._rest_files, self.epoch), self.split), listed=True
            )
        for _ in range(self.skip, self.steps):
            batch = self._next()
            if batch is None:
                raise RuntimeError(f"the rest of epoch {self.epoch + 1} ended before {self.steps} batches")
            self._yielded += 1
            yield self._convert(batch)
        self.iterator = None  # the listed pipeline goes; the next epoch builds the reader's

    def _next(self):
        """The next DALI batch, or None at the end of DALI's epoch (the iterator then resets itself)."""
        try:
            return next(self.iterator)
        except StopIteration:
            return None
        except RuntimeError as exc:
            raise self._decode_error(exc) from None

    def _drain(self) -> None:
        if self._mid_epoch:
            while self._next() is not None:
                pass
            self._mid_epoch = False

    def _convert(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        # The tensors are torch's own (OWN_THE_BATCH): keeping or dropping them is safe.
        out = batch[0]
        images, labels = out["images"], out["labels"].view(-1).long()
        if "keys" in out:
            self._keys += [self._name(bytes(row.numpy()).rstrip(b"\0").decode()) for row in out["keys"]]
        p = self.placement
        if p.channels_last:
            images = images.permute(0, 3, 1, 2)  # NHWC memory seen as a channels_last NCHW tensor
        if images.dtype != p.dtype:
            images = images.to(p.dtype)
        return images.to(p.device, non_blocking=True), labels.to(p.device, non_blocking=True)

    def _name(self, source_info: str) -> str:
        """Split.name from DALI's source_info: a file's path, or `<shard>:<offset>:<key>.<ext>` in a pack."""
        if self.split.packed:
            return source_info.rsplit(":", 1)[-1].split(".", 1)[0]
        return Path(source_info).relative_to(self.split.root).as_posix()

    def _decode_error(self, exc: RuntimeError) -> DataError:
        # DALI's message is a traceback; the line after "encountered:" says what failed, and
        # names the file only for some errors: look for the likely culprits then.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        after = lines.index("encountered:") + 1 if "encountered:" in lines else 0
        detail = lines[after] if after < len(lines) else type(exc).__name__
        root = self.split.root.parent if self.split.root.name in ("train", "val") else self.split.root
        if self.split.packed:
            from .shards import suspect_samples

            bad, what = suspect_samples(self.split.members), "samples"
            hint = (
                "a pack holds only files that decoded when packed: damaged since? "
                f"`flowers-dist data check {root} --decode` names every sample that does not decode"
            )
        else:
            bad, what = list(map(str, suspect_files(self.split.files))), "files"
            hint = (
                "data.check=true, the default, leaves undecodable files out; "
                f"`flowers-dist data check {root}` lists them"
            )
        named = f"; {what} that look truncated or not images: {', '.join(bad)}" if bad else ""
        return DataError(f"the DALI pipeline failed on {self.split.root}: {detail[:300]}{named} ({hint})")


def suspect_files(files, limit: int = 3) -> list:
    """Files whose first and last bytes are not those of a whole JPEG or PNG (a cheap scan after a failure).

    A pack's samples are scanned by shards.suspect_samples, with the same test."""
    from .shards import looks_whole

    bad = []
    for path in files:
        try:
            with open(path, "rb") as fh:
                head = fh.read(8)
                fh.seek(max(0, path.stat().st_size - 12))
                tail = fh.read()
        except OSError:
            bad.append(path)
            continue
        if not looks_whole(head, tail):
            bad.append(path)
            if len(bad) == limit:
                break
    return bad


def use_fused_finish(cfg: DataConfig, on_gpu: bool) -> tuple[bool, str]:
    """Whether the training graph ends with dali_fused's kernel, and why (for the log)."""
    if on_gpu:
        return False, "GPU graph: DALI's operators"
    if cfg.rotation <= 0 and cfg.color_jitter <= 0:
        return False, "no rotation or colour jitter: crop_mirror_normalize alone"
    from .dali_fused import numba_status

    ok, why = numba_status()
    if not ok:
        return False, f"{why}: DALI's rotate and color_twist, about 1.8x slower on the CPU (pip install numba)"
    return True, f"rotation, colour jitter, flip and normalisation fused in one kernel ({why})"


def _built(pipe, split: Split):
    """The pipeline, built; a build failure is a one-line DataError."""
    try:
        pipe.build()
    except RuntimeError as exc:
        raise DataError(f"could not build the DALI pipeline for {split.root}: {str(exc).splitlines()[0]}") from None
    return pipe


def build_dali_loader(
    cfg: DataConfig,
    split: Split,
    train: bool,
    batch_size: int,
    placement: Placement,
    seed: int,
    max_steps: int = 0,
    resume_state: ReaderState | str | None = None,
    fused: bool | None = None,
    accum: int = 1,
) -> DaliLoader:
    """The DALI loader for one split; placement.workers is DALI's thread count (0 counts as 1).

    A packed split (split.members) is read from its shards by `fn.readers.webdataset`; the rest
    of the graph is the same. Training also returns each sample's source_info, so that `trained()`
    names the samples handed out (train.record_samples) and a save records them (`resume_state`).

    fused: end the CPU training graph with the one-pass kernel (None: wherever it applies and
    numba imports; False: DALI's operators, as the benchmark compares). Training yields the
    epoch's full optimizer steps, `accum` micro-batches each; only a max_steps (micro-batches)
    below that, train.max_steps_per_epoch, reads just the files it yields (`_CutEpochs`), and
    resume_state is then unused.
    """
    p = placement
    on_gpu = p.device.type == "cuda"
    # Accelerate binds each process to its local GPU; device.index is that GPU.
    device_id = (p.device.index if p.device.index is not None else torch.cuda.current_device()) if on_gpu else None
    common = dict(
        files=[] if split.packed else [str(f) for f in split.files],
        labels=[] if split.packed else list(split.labels),
        shards=_pack_shards(split) if split.packed else None,
        cfg=cfg,
        shard_id=p.rank,
        num_shards=p.world_size,
        on_gpu=on_gpu,
        dtype=p.dtype,
        channels_last=p.channels_last,
        batch_size=batch_size,
        num_threads=max(1, p.workers),
        device_id=device_id,
        **OWN_THE_BATCH,
    )
    if not train:
        return _val_loader(common, split, p, seed)
    return _train_loader(common, split, p, seed, max_steps, resume_state, fused, accum)


def _pack_shards(split: Split) -> tuple[list[str], list[str]]:
    """The tars of a packed split, in pack order, and their index files (named by `data pack` beside them)."""
    tars = sorted({m.shard for m in split.members})
    return [str(t) for t in tars], [str(t.with_suffix(".idx")) for t in tars]


def _val_loader(common: dict, split: Split, p: Placement, seed: int) -> DaliLoader:
    n = len(split)
    pipe = val_pipeline(**common, seed=seed % 2**31)
    # Reader shards are [floor(r n / w), floor((r + 1) n / w)).
    num_samples = (p.rank + 1) * n // p.world_size - p.rank * n // p.world_size
    # steps=0: the iterator's length, the padded shard's batches, the same on every rank
    return DaliLoader(_built(pipe, split), train=False, steps=0, num_samples=num_samples, placement=p, split=split)


def _train_loader(
    common: dict,
    split: Split,
    p: Placement,
    seed: int,
    max_steps: int,
    resume_state: ReaderState | str | None,
    fused: bool | None,
    accum: int,
) -> DaliLoader:
    n, batch_size = len(split), common["batch_size"]
    # Micro-batches of the epoch's full optimizer steps: with accumulation the last partial global batch
    # is left to the drain, so the one pipeline and its reader state serve every epoch, as without it.
    full_steps = n // (batch_size * p.world_size * accum) * accum
    steps = min(full_steps, max_steps) if max_steps else full_steps
    if steps == 0:
        raise DataError(f"{split.root}: {n} images do not fill one global batch of {batch_size * p.world_size * accum}")
    fused = _chosen_finish(common["cfg"], common["on_gpu"], fused, log_it=p.rank == 0)
    # The augmentation seed differs per rank; the reader's seed is the same on all.
    pipe_seed = (seed * 1_000_003 + p.rank) % 2**31
    if steps < full_steps:
        cut = _CutEpochs(
            _epoch_pipelines({**common, "members": split.members}, seed, pipe_seed, fused),
            n,
            batch_size,
            p.rank,
            p.world_size,
            seed,
            steps,
            accum,
        )
        return DaliLoader(
            None, train=True, steps=steps, num_samples=steps * batch_size, placement=p, split=split, cut=cut
        )  # a cut epoch's samples are known from its list: no keys from the pipeline
    listed = _epoch_pipelines({**common, "members": split.members}, seed, pipe_seed, fused)
    return _reader_loader(common, split, p, steps, resume_state, listed, seed, pipe_seed, fused, accum)


def _reader_loader(
    common: dict,
    split: Split,
    p: Placement,
    steps: int,
    resume_state: ReaderState | str | None,
    listed: Callable[[list[int], int], object],
    seed: int,
    pipe_seed: int,
    fused: bool,
    accum: int,
) -> DaliLoader:
    """Full epochs from DALI's reader; after a resume with no reader position for this rank, the epoch's rest first."""
    # An older checkpoint saved the reader's state alone; now it comes with what the rank trained.
    state = ReaderState(reader=resume_state, trained=[]) if isinstance(resume_state, str) else resume_state

    def reader_pipeline(checkpoint: str | None = None, epoch: int = 0):
        # Checkpointing lets a resumed run continue the reader's permutations and the random
        # streams exactly where the saved epoch ended (resume_state), instead of restarting them.
        # The samples' names (source_info) are what a resume at another world size needs.
        # `epoch` sets the crop side (progressive resizing); the reader's position is the checkpoint's.
        return train_pipeline(
            **{**common, "cfg": at_epoch(common["cfg"], epoch)}, reader_seed=seed, seed=pipe_seed, fused=fused,
            keys=True, enable_checkpointing=True, checkpoint=checkpoint,
        )  # fmt: skip

    batch_size = common["batch_size"]
    loader = dict(
        train=True,
        steps=steps,
        num_samples=steps * batch_size,
        placement=p,
        split=split,
        keys=True,
        size_of=partial(train_size, common["cfg"]),
    )
    if state is not None and state["reader"] is None:  # no position of this rank to continue from
        names = [split.name(i) for i in range(len(split))]
        rest = _RestOfEpoch(listed, names, set(state["trained"]), batch_size, p, seed, accum)
        # One rank keeps what was trained before the resume in its saves: the union is what counts.
        carried = state["trained"] if p.rank == 0 else []
        return DaliLoader(None, **loader, rest=rest, reader=reader_pipeline, carried=carried)
    reader = state["reader"] if state is not None else None
    return DaliLoader(
        _built(reader_pipeline(reader), split),
        **loader,
        restored=reader is not None,
        reader=reader_pipeline,
        carried=state["trained"] if state is not None else [],
    )


def _chosen_finish(cfg: DataConfig, on_gpu: bool, fused: bool | None, log_it: bool) -> bool:
    """Whether the training graph ends with the fused kernel: as asked, or where it applies (use_fused_finish)."""
    auto_fused, why = use_fused_finish(cfg, on_gpu)
    chosen = auto_fused if fused is None else fused
    if log_it:
        log.info(
            "DALI training graph on the %s: %s",
            "GPU" if on_gpu else "CPU",
            why if chosen == auto_fused else f"fused={chosen} as asked",
        )
    return chosen


def _epoch_pipelines(common: dict, seed: int, pipe_seed: int, fused: bool) -> Callable[[list[int], int], object]:
    """For `_CutEpochs`: a pipeline over just the given files, read in order, with the epoch's augmentation seed."""

    def epoch_pipeline(indices: list[int], epoch: int):
        if common["shards"] is not None:  # a pack: the listed samples, read by offset
            members = tuple(common["members"][i] for i in indices)
            files = dict(files=[], labels=[], shards=None, samples=members, shard_id=0, num_shards=1)
        else:
            files = dict(
                files=[common["files"][i] for i in indices],
                labels=[common["labels"][i] for i in indices],
                shard_id=0,
                num_shards=1,
            )
        return train_pipeline(
            **{**{k: v for k, v in common.items() if k != "members"}, **files, "cfg": at_epoch(common["cfg"], epoch)},
            reader_seed=seed,
            seed=(pipe_seed * 1_000_003 + epoch) % 2**31,
            fused=fused,
            shuffle=False,
            enable_checkpointing=True,
        )

    return epoch_pipeline
