"""Common corruptions of uint8 images (ImageNet-C / CIFAR-10-C / MNIST-C style), severities 1-5.

Hendrycks and Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019, define 15 corruptions at 5 severities each (ImageNet-C at 224x224,
CIFAR-10-C at 32x32, both from the authors' ``make_imagenet_c.py`` / ``make_cifar_c.py``); Mu and
Gilmer, "MNIST-C: A Robustness Benchmark for Computer Vision", 2019, apply the same recipes to
28x28 grey digits (one fixed severity each). Here every corruption works on a batch of uint8 images
(N, C, H, W) for any C, H, W, at each of the 5 severities.

Severity tables (``SEVERITIES``, one parameter per severity 1..5):

- Corruptions whose effect does not depend on the image size (additive / multiplicative noise,
  contrast, brightness) take ImageNet-C's table unchanged, as MNIST-C does.
- Corruptions whose effect is measured in pixels (blurs, fog's noise field, pixelation, JPEG's
  8x8 blocks) take CIFAR-10-C's table, the one the authors made for 32x32 images; lengths in
  pixels (blur sigmas and radii) are scaled by min(H, W) / 32 (0.875 at 28x28). ImageNet-C's
  pixel lengths scaled down 8x from 224 px would barely blur a 28x28 image, and its pixelation
  and JPEG levels would erase one.

Randomness comes only from the generator made from ``seed`` (an int, a ``numpy.random.Generator``
or a ``torch.Generator``); no global RNG is touched, so ``corrupt(x, name, severity, seed)`` is a
pure function of its arguments. Images are processed in fixed chunks of ``CHUNK`` images with one
generator consumed in order, so the result does not depend on the machine.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy import ndimage

# torch is imported inside the functions that use it: config validation reads CORRUPTIONS and
# check_corruption without loading torch

SEVERITY_RANGE = (1, 5)
CHUNK = 2048  # images per vectorised step (memory bound; results do not depend on it being fixed)

# name -> the parameter of severities 1..5, with its origin
SEVERITIES: dict[str, list] = {
    # ImageNet-C (resolution-free): std of N(0, c) added to x in [0, 1]
    "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],
    # ImageNet-C: photon count scale, x' = Poisson(c x) / c
    "shot_noise": [60, 25, 12, 5, 3],
    # ImageNet-C: salt-and-pepper amount (fraction of values set to 0 or 1)
    "impulse_noise": [0.03, 0.06, 0.09, 0.17, 0.27],
    # ImageNet-C: std of the multiplicative noise, x' = x + x N(0, c)
    "speckle_noise": [0.15, 0.2, 0.35, 0.45, 0.6],
    # CIFAR-10-C (pixels at 32x32, scaled by min(H, W) / 32): Gaussian blur sigma
    "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1.0],
    # CIFAR-10-C: (disk radius, alias-blur sigma) of the defocus kernel, pixels (not rescaled)
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)],
    # CIFAR-10-C: (radius, sigma) of ImageMagick's motion blur, pixels at 32x32; angle U(-45, 45) deg
    "motion_blur": [(10, 1.0), (10, 1.5), (10, 2.0), (10, 2.5), (12, 3.0)],
    # ImageNet-C: contrast factor, x' = (x - mean) c + mean (mean per image and channel)
    "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],
    # ImageNet-C: added to the HSV value channel
    "brightness": [0.1, 0.2, 0.3, 0.4, 0.5],
    # CIFAR-10-C: (fog strength, decay of the plasma fractal per octave), fractal map 32x32
    "fog": [(0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75)],
    # CIFAR-10-C: side factor of the box-downsampled image (upsampled back)
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
    # CIFAR-10-C: JPEG quality (8x8 blocks make it resolution-dependent)
    "jpeg_compression": [80, 65, 58, 50, 40],
}


# --- helpers ---------------------------------------------------------------------------------

def _scale(x: np.ndarray) -> float:
    """Pixel lengths of the 32x32 tables, scaled to this image size."""
    return min(x.shape[-2:]) / 32.0


def _generator(seed) -> np.random.Generator:
    import torch

    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=seed)))
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return np.random.default_rng(int(seed))
    raise TypeError(f"seed: an int, numpy.random.Generator or torch.Generator expected, got {type(seed).__name__}")


def _convolve_each(x: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """Convolve image n (all its channels) with kernels[n] (K x K, K odd), replicate padding."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    k = kernels.shape[-1]
    xt = torch.from_numpy(np.ascontiguousarray(x)).reshape(1, n * c, h, w)
    xt = F.pad(xt, (k // 2,) * 4, mode="replicate")
    weight = torch.from_numpy(np.ascontiguousarray(kernels, dtype=np.float32))
    weight = weight[:, None].repeat_interleave(c, dim=0)  # (N*C, 1, K, K): one group per image channel
    return F.conv2d(xt, weight, groups=n * c).reshape(n, c, h, w).numpy()


# --- noise ------------------------------------------------------------------------------------

def gaussian_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(0.0, c, size=x.shape).astype(np.float32)


def shot_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return (rng.poisson(x * c) / c).astype(np.float32)


def impulse_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    # salt and pepper on a fraction c of the values (each channel on its own), half of each
    hit = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    return np.where(hit, salt.astype(np.float32), x)


def speckle_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return x + x * rng.normal(0.0, c, size=x.shape).astype(np.float32)


# --- blur -------------------------------------------------------------------------------------

def gaussian_blur(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    s = c * _scale(x)
    return ndimage.gaussian_filter(x, sigma=(0, 0, s, s), mode="nearest")


def _disk_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """A disk of ``radius`` pixels, smoothed by a 3x3 Gaussian of ``alias_sigma`` against aliasing."""
    half = int(math.ceil(radius)) + 1
    grid = np.arange(-half, half + 1, dtype=np.float64)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    t = np.arange(-1, 2, dtype=np.float64)
    g = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * max(alias_sigma, 1e-6) ** 2))
    g /= g.sum()
    kernel = np.zeros((disk.shape[0] + 2,) * 2)
    for i in range(3):  # full 2-D convolution of the disk with the 3x3 Gaussian
        for j in range(3):
            kernel[i:i + disk.shape[0], j:j + disk.shape[1]] += g[i, j] * disk
    return (kernel / kernel.sum()).astype(np.float32)


def defocus_blur(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    # not rescaled: the disk lives on the pixel grid (radius < 1 is the centre pixel, 1 a plus,
    # 1.5 the 3x3 square), and scaling 32 -> 28 px would merge CIFAR-10-C's levels 4 and 1-3
    kernel = _disk_kernel(c[0], c[1])
    return ndimage.convolve(x, kernel[None, None], mode="mirror")


def motion_blur(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    # ImageMagick's motion blur, as ImageNet-C calls it: a one-sided line of Gaussian weights
    # exp(-t^2 / (2 sigma^2)), t = 0 .. radius pixels, along an angle drawn per image
    s = _scale(x)
    radius, sigma = c[0] * s, c[1] * s
    taps = int(math.ceil(min(radius, 4 * sigma)))
    t = np.arange(taps + 1, dtype=np.float64)
    weights = np.exp(-t ** 2 / (2 * sigma ** 2))
    weights /= weights.sum()
    angle = np.deg2rad(rng.uniform(-45.0, 45.0, size=len(x)))
    rows = taps + np.rint(t[None, :] * np.sin(angle)[:, None]).astype(int)
    cols = taps + np.rint(t[None, :] * np.cos(angle)[:, None]).astype(int)
    kernels = np.zeros((len(x), 2 * taps + 1, 2 * taps + 1))
    np.add.at(kernels, (np.repeat(np.arange(len(x)), taps + 1), rows.ravel(), cols.ravel()),
              np.tile(weights, len(x)))
    return _convolve_each(x, kernels)


# --- photometric ------------------------------------------------------------------------------

def contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    means = x.mean(axis=(2, 3), keepdims=True)
    return (x - means) * c + means


def brightness(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    # HSV value + c, hue and saturation kept: every channel scales by V'/V (V = max over channels);
    # a black pixel (V = 0) becomes grey V'. For one channel this is x + c.
    v = x.max(axis=1, keepdims=True)
    v_new = np.clip(v + c, 0.0, 1.0)
    ratio = np.divide(v_new, v, out=np.zeros_like(v), where=v > 0)
    return np.where(v > 0, x * ratio, v_new)


def _plasma_fractal(n: int, size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """n diamond-square fractals of side ``size`` (a power of 2, wrapping), each scaled to [0, 1].

    ImageNet-C's convention: the noise amplitude of an octave is wibble^2 with wibble divided by
    ``decay`` per octave (so the amplitude falls by decay^2 per octave).
    """
    m = np.zeros((n, size, size))
    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        amp = wibble * wibble
        corners = m[:, ::step, ::step]
        # square step: the centre of every square is the mean of its 4 corners, plus noise
        mean4 = (corners + np.roll(corners, -1, 1) + np.roll(corners, -1, 2)
                 + np.roll(np.roll(corners, -1, 1), -1, 2)) / 4
        m[:, half::step, half::step] = mean4 + amp * rng.uniform(-1, 1, mean4.shape)
        centres = m[:, half::step, half::step]
        # diamond step: edge midpoints are the mean of their 2 corners and 2 centres, plus noise
        top = (corners + np.roll(corners, -1, 2) + centres + np.roll(centres, 1, 1)) / 4
        left = (corners + np.roll(corners, -1, 1) + centres + np.roll(centres, 1, 2)) / 4
        m[:, ::step, half::step] = top + amp * rng.uniform(-1, 1, top.shape)
        m[:, half::step, ::step] = left + amp * rng.uniform(-1, 1, left.shape)
        step, wibble = half, wibble / decay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / np.maximum(m.max(axis=(1, 2), keepdims=True), 1e-12)


def fog(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    n, _, h, w = x.shape
    size = 1 << max(1, math.ceil(math.log2(max(h, w))))
    field = _plasma_fractal(n, size, c[1], rng)[:, None, :h, :w].astype(np.float32)
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    return (x + c[0] * field) * peak / (peak + c[0])


def _box_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of PIL's BOX resampling: output pixel o averages the input pixels
    whose centres fall in a window of width max(n_in / n_out, 1) centred on o's centre (mapped to
    input coordinates), window [lo, hi)."""
    scale = n_in / n_out
    centre = (np.arange(n_out) + 0.5) * scale
    half = 0.5 * max(scale, 1.0)
    pix = np.arange(n_in) + 0.5
    w = ((pix[None, :] >= centre[:, None] - half) & (pix[None, :] < centre[:, None] + half)).astype(np.float64)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _box_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    rows, cols = _box_matrix(x.shape[-2], size[0]), _box_matrix(x.shape[-1], size[1])
    return np.einsum("oh,nchw,pw->ncop", rows, x, cols, optimize=True)


def pixelate(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    # CIFAR-10-C: box-downsample to c times the side, box-upsample back (PIL's BOX both ways)
    h, w = x.shape[-2:]
    small = _box_resize(x, (max(1, int(h * c)), max(1, int(w * c))))
    return _box_resize(small, (h, w))


def jpeg_compression(x: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    import io

    from PIL import Image

    # one encode/decode per image (and per channel unless the image is grey or RGB): no batch codec
    u8 = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    out = np.empty_like(u8)
    for i in range(len(u8)):
        planes = [u8[i].transpose(1, 2, 0)] if u8.shape[1] == 3 else [u8[i, ch] for ch in range(u8.shape[1])]
        decoded = []
        for plane in planes:
            buf = io.BytesIO()
            Image.fromarray(plane).save(buf, format="JPEG", quality=int(c))
            decoded.append(np.asarray(Image.open(io.BytesIO(buf.getvalue()))))
        out[i] = decoded[0].transpose(2, 0, 1) if u8.shape[1] == 3 else np.stack(decoded)
    return out.astype(np.float32) / 255.0


CORRUPTIONS: dict[str, Callable[[np.ndarray, object, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "contrast": contrast,
    "brightness": brightness,
    "fog": fog,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}
# each function takes (x in [0, 1], float32 (N, C, H, W), the severity's parameter, generator)
# and returns the corrupted float array (clipped and quantised by ``corrupt``)


def check_corruption(name: str, severity: int) -> None:
    """Raise ValueError naming the field when ``name`` or ``severity`` is not valid."""
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption {name!r} does not exist; valid: {sorted(CORRUPTIONS)}")
    lo, hi = SEVERITY_RANGE
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)):
        raise ValueError(f"severity {severity!r} is not an integer in {lo}-{hi}")
    if not lo <= severity <= hi:
        raise ValueError(f"severity {severity} is outside {lo}-{hi}")


def corrupt(x: "torch.Tensor | np.ndarray", name: str, severity: int, seed) -> "torch.Tensor":
    """``x`` (uint8, (N, C, H, W)) with corruption ``name`` at ``severity`` (1-5); uint8, same shape.

    ``seed``: an int, a ``numpy.random.Generator`` or a ``torch.Generator`` (the same seed gives
    the same images).
    """
    import torch
    check_corruption(name, severity)
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(f"corrupt: uint8 images (N, C, H, W) expected, got {arr.dtype} with shape {arr.shape}")
    rng = _generator(seed)
    fn, param = CORRUPTIONS[name], SEVERITIES[name][severity - 1]
    out = np.empty_like(arr)
    for start in range(0, len(arr), CHUNK):
        chunk = arr[start:start + CHUNK].astype(np.float32) / 255.0
        result = fn(chunk, param, rng)
        out[start:start + CHUNK] = np.clip(np.rint(np.clip(result, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)
    return torch.from_numpy(out)
