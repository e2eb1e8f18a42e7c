"""One compiled pass for the end of DALI's CPU training graph: rotate, colour jitter, flip, normalise.

On the CPU, DALI's own operators for these steps read and write the whole image once each,
through generic per-pixel loops: with rotation and colour jitter they cost more than decoding
(measured on the 2-core VM, batch 64, 224 px: rotate 0.18 ms, colour_twist 0.54 ms,
crop_mirror_normalize 0.09 ms per image, against 0.39 ms for the ROI decode). This module does
the three in one pass per image, compiled by numba and run by DALI's `NumbaFunction` operator
in DALI's own CPU threads: about 0.15 ms per image on one core.

It computes what the DALI operators compute, so the GPU graph (which keeps them: on the GPU
they are cheap) and this one augment alike; tests compare the two on the same draws:
- `fn.rotate(angle, keep_size=True, fill_value=0, interp_type=INTERP_NN)`: each output pixel
  centre is rotated about the image centre and takes the nearest input pixel, 0 outside;
- `fn.color_twist(brightness=b, contrast=c, saturation=s)`: out = b * (c * S(s) x + 128 (1 - c)),
  with S(s) = s I + (1 - s) 1 w^T and w the Rec. 601 luma weights (DALI's YIQ saturation), then
  clamped to [0, 255] (DALI also rounds to uint8 there: under half a grey level apart);
- `fn.crop_mirror_normalize(mirror, mean, std)`: horizontal flip and (x - mean) / std, CHW or HWC.

numba is imported only when this graph is built: GPU hosts never need it.
"""

from __future__ import annotations

import functools
import math

import numpy as np

# The per-sample parameter vector, assembled in the DALI graph.
ANGLE, BRIGHTNESS, CONTRAST, SATURATION, MIRROR = range(5)
MEAN = 5  # first of the three per-channel means, 0-255 scale
INV_STD = 8  # first of the three per-channel 1 / std, 0-255 scale
NUM_PARAMS = INV_STD + 3

_LUMA = (0.299, 0.587, 0.114)


def _numba_function_class():
    """DALI's NumbaFunction operator: in nvidia.dali.plugin.numba in recent DALI, under .experimental before."""
    try:
        from nvidia.dali.plugin.numba import NumbaFunction
    except ImportError:
        from nvidia.dali.plugin.numba.experimental import NumbaFunction
    return NumbaFunction


def numba_status() -> tuple[bool, str]:
    """Whether the fused kernel can be compiled here, and why not."""
    try:
        import numba

        _numba_function_class()
    except (ImportError, OSError) as exc:
        return (
            False,
            f"numba does not import ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
        )
    return True, f"numba {numba.__version__}"


def _finish(out, img, prm, chw):
    """out <- normalise(flip(colour(rotate(img)))) for one HWC uint8 image; out is CHW or HWC float32."""
    height, width = img.shape[0], img.shape[1]
    one, zero, top = np.float32(1.0), np.float32(0.0), np.float32(255.0)
    angle = prm[ANGLE] * np.float32(math.pi / 180.0)
    cos_a, sin_a = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    b, c, s = prm[BRIGHTNESS], prm[CONTRAST], prm[SATURATION]
    # b * c * (s I + (1 - s) 1 w^T): row i is k (1 - s) w, plus k s on the diagonal.
    k = b * c
    g0, g1, g2 = (
        k * (one - s) * np.float32(_LUMA[0]),
        k * (one - s) * np.float32(_LUMA[1]),
        k * (one - s) * np.float32(_LUMA[2]),
    )
    d = k * s
    offset = np.float32(128.0) * (one - c) * b
    # Normalisation folded into one multiply-add: (v - mean) / std = v * inv - mean * inv.
    inv0, inv1, inv2 = prm[INV_STD], prm[INV_STD + 1], prm[INV_STD + 2]
    sub0, sub1, sub2 = prm[MEAN] * inv0, prm[MEAN + 1] * inv1, prm[MEAN + 2] * inv2
    cx, cy = np.float32(width * 0.5), np.float32(height * 0.5)
    mirrored = prm[MIRROR] > np.float32(0.5)
    step = -one if mirrored else one
    first = (np.float32(width - 1) if mirrored else zero) + np.float32(0.5) - cx
    row = np.empty((3, width), np.float32)
    for y in range(height):
        dy = np.float32(y) + np.float32(0.5) - cy
        # Gather the rotated row (nearest pixel; the output x runs backwards when mirrored).
        for x in range(width):
            dx = first + step * np.float32(x)
            sx = cos_a * dx - sin_a * dy + cx
            sy = sin_a * dx + cos_a * dy + cy
            # int() truncates towards zero; the +1/-1 makes it a floor for sx > -1, and
            # anything at or below -1 is outside anyway.
            ix, iy = int(sx + one) - 1, int(sy + one) - 1
            if 0 <= ix < width and 0 <= iy < height:
                row[0, x], row[1, x], row[2, x] = img[iy, ix, 0], img[iy, ix, 1], img[iy, ix, 2]
            else:
                row[0, x], row[1, x], row[2, x] = zero, zero, zero
        # Colour and normalise the row: a separate loop the compiler can vectorise.
        for x in range(width):
            r, g, bl = row[0, x], row[1, x], row[2, x]
            grey = g0 * r + g1 * g + g2 * bl + offset
            v0 = min(max(grey + d * r, zero), top) * inv0 - sub0
            v1 = min(max(grey + d * g, zero), top) * inv1 - sub1
            v2 = min(max(grey + d * bl, zero), top) * inv2 - sub2
            if chw:
                out[0, y, x], out[1, y, x], out[2, y, x] = v0, v1, v2
            else:
                out[y, x, 0], out[y, x, 1], out[y, x, 2] = v0, v1, v2


@functools.cache
def _kernel():
    from numba import njit

    # fastmath: reassociation and FMA in the colour loop; measured 0.15 vs 0.19 ms per 224 px image.
    # cache: later processes load the compiled kernel instead of compiling it (about a second).
    try:
        return njit(fastmath=True, nogil=True, cache=True)(_finish)
    except RuntimeError:  # numba found no writable cache folder (read-only install and home): compile each time
        return njit(fastmath=True, nogil=True)(_finish)


def kernel(out: np.ndarray, img: np.ndarray, prm: np.ndarray, chw: bool = True) -> None:
    """The compiled kernel, callable on NumPy arrays (for tests and benchmarks)."""
    _kernel()(out, img, prm, chw)


@functools.cache
def finish_operator(channels_last: bool):
    """A DALI NumbaFunction operator running the kernel per sample: (HWC uint8 image, params) -> float32.

    Cached per process: building it compiles DALI's wrappers around the kernel (about a second),
    which every pipeline built afterwards reuses.
    """
    from nvidia.dali import types

    NumbaFunction = _numba_function_class()
    compiled, chw = _kernel(), not channels_last

    def run(out, img, prm):
        compiled(out, img, prm, chw)

    def setup(outs, ins):
        # Output shape: the input's H and W, channels first or last.
        for i in range(len(outs[0])):
            h, w, ch = ins[0][i][0], ins[0][i][1], ins[0][i][2]
            if chw:
                outs[0][i][0], outs[0][i][1], outs[0][i][2] = ch, h, w
            else:
                outs[0][i][0], outs[0][i][1], outs[0][i][2] = h, w, ch

    return NumbaFunction(
        run_fn=run,
        setup_fn=setup,
        in_types=[types.UINT8, types.FLOAT],
        out_types=[types.FLOAT],
        ins_ndim=[3, 1],
        outs_ndim=[3],
        batch_processing=False,
        device="cpu",
    )
