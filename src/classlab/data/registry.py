"""The dataset registry: a name maps to a DatasetSpec, nothing else.

Every dataset goes through the same path: ``download`` places checksummed raw files under
``data/raw/<name>/``; ``load_raw`` turns them into uint8 arrays (N, C, H, W) and int64
labels, which ``prepare`` stores as tensors with a manifest.

Scene datasets (``fashion_mnist_scenes``, ``digits_scenes``, ``mnist_scenes``) are specs of the
same kind: their raw files, mirror and parser are the base dataset's (``scene_base``), and
``prepare`` builds single-target scenes from them (``classlab.data.scenes``) with the spec's
``scene_defaults`` unless a recipe overrides them. Their ``class_names`` and ``size`` are those
of the default recipe (the target classes, the canvas side); the manifest has the real ones.

Pairs datasets (``fashion_mnist_pairs``, ``digits_pairs``) are specs of the same kind with a
``pairs_base``: ``prepare`` colours the base's grayscale images into attribute-object pairs
(``classlab.data.pairs``); their ``class_names`` are the default recipe's pair names.

Dense scene datasets (``fashion_mnist_lt_scenes``, ``digits_lt_scenes``) are specs with a
``dense_base``: ``prepare`` builds long-tailed multi-object scenes of colour x object classes with
boxes and instance and semantic masks (``classlab.data.dense_scenes``); their ``class_names`` and
``size`` are the default recipe's.
"""
from __future__ import annotations

import gzip
import shutil
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from classlab.data.download import RemoteFile, fetch

FASHION_MNIST_MIRROR = "/usr/share/datasets/fashion-mnist"


@dataclass
class RawSplits:
    train_x: np.ndarray  # uint8 (N, C, H, W)
    train_y: np.ndarray  # int64 (N,)
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str] | None = None  # where the raw files name the classes themselves


@dataclass
class DatasetSpec:
    name: str
    class_names: list[str]
    channels: int
    size: int
    files: list[RemoteFile] = field(default_factory=list)
    default_mirror: str | None = None
    # load_raw(raw_dir) -> RawSplits; parses verified raw files
    load_raw: Callable[[Path], RawSplits] | None = None
    # for datasets that ship with a package: write the raw files without any download
    materialize: Callable[[Path], None] | None = None
    # scene datasets: the registry name whose raw files they are built from, and their default
    # recipe keys (over classlab.data.scenes.SINGLE_TARGET_RECIPE)
    scene_base: str | None = None
    scene_defaults: dict | None = None
    # attribute-object pair datasets: the registry name whose raw files are coloured into pairs, and
    # their default recipe keys (over classlab.data.pairs.PAIRS_RECIPE)
    pairs_base: str | None = None
    pairs_defaults: dict | None = None
    # long-tailed dense scene datasets (masks, many attribute x object classes): the registry name whose
    # raw files they are built from, and their default recipe keys (over classlab.data.dense_scenes.DENSE_RECIPE)
    dense_base: str | None = None
    dense_defaults: dict | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def download(self, raw_dir: Path, mirror: str | None = None) -> list[Path]:
        raw_dir = Path(raw_dir)
        raw_dir.mkdir(parents=True, exist_ok=True)
        if self.materialize is not None:
            self.materialize(raw_dir)
            return sorted(p for p in raw_dir.iterdir() if p.is_file())
        mirror = mirror if mirror is not None else self.default_mirror
        mirror_path = Path(mirror) if mirror and Path(mirror).is_dir() else None
        return [fetch(remote, raw_dir, mirror_path) for remote in self.files]

    def with_files(self, files: list[RemoteFile]) -> "DatasetSpec":
        """A copy served from other locations (a private mirror, or a test's loopback server)."""
        return replace(self, files=list(files), default_mirror=None)


DATASETS: dict[str, Callable[[], DatasetSpec]] = {}


def register_dataset(name: str):
    def wrap(builder: Callable[[], DatasetSpec]):
        DATASETS[name] = builder
        return builder
    return wrap


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name]()


# --- IDX (MNIST-format) files -------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (gzipped or not): magic 0x0000 08 <ndim>, big-endian dims, uint8 data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header promises {expected} bytes, file holds {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _idx_splits(raw_dir: Path, prefix: str = "") -> RawSplits:
    def images(name):
        return read_idx(raw_dir / name)[:, None, :, :].copy()

    def labels(name):
        return read_idx(raw_dir / name).astype(np.int64)

    return RawSplits(images(f"{prefix}train-images-idx3-ubyte.gz"), labels(f"{prefix}train-labels-idx1-ubyte.gz"),
                     images(f"{prefix}t10k-images-idx3-ubyte.gz"), labels(f"{prefix}t10k-labels-idx1-ubyte.gz"))


FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


@register_dataset("fashion_mnist")
def fashion_mnist() -> DatasetSpec:
    # md5: the sums published with the dataset (of the .gz files). payload_md5: of the
    # decompressed IDX bytes, measured on Debian's dataset-fashion-mnist package, which
    # recompressed the same content (so its .gz sums differ from the published ones).
    files = [
        RemoteFile("train-images-idx3-ubyte.gz", FASHION_URL + "train-images-idx3-ubyte.gz",
                   "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        RemoteFile("train-labels-idx1-ubyte.gz", FASHION_URL + "train-labels-idx1-ubyte.gz",
                   "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
        RemoteFile("t10k-images-idx3-ubyte.gz", FASHION_URL + "t10k-images-idx3-ubyte.gz",
                   "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
        RemoteFile("t10k-labels-idx1-ubyte.gz", FASHION_URL + "t10k-labels-idx1-ubyte.gz",
                   "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
    ]
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
             "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    return DatasetSpec("fashion_mnist", names, 1, 28, files, FASHION_MNIST_MIRROR, _idx_splits)


# --- torchvision-backed datasets: our download code, torchvision's parsers ----------------

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"


def _mnist_splits(raw_dir: Path) -> RawSplits:
    from torchvision.datasets import MNIST

    # torchvision reads the un-gzipped files from <root>/MNIST/raw/
    tv_raw = raw_dir / "torchvision" / "MNIST" / "raw"
    tv_raw.mkdir(parents=True, exist_ok=True)
    for gz in raw_dir.glob("*.gz"):
        target = tv_raw / gz.name[:-3]
        if not target.exists():
            with gzip.open(gz, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    train = MNIST(raw_dir / "torchvision", train=True, download=False)
    test = MNIST(raw_dir / "torchvision", train=False, download=False)
    return RawSplits(train.data.numpy()[:, None].copy(), train.targets.numpy().astype(np.int64),
                     test.data.numpy()[:, None].copy(), test.targets.numpy().astype(np.int64))


@register_dataset("mnist")
def mnist() -> DatasetSpec:
    files = [
        RemoteFile("train-images-idx3-ubyte.gz", MNIST_URL + "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        RemoteFile("train-labels-idx1-ubyte.gz", MNIST_URL + "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
        RemoteFile("t10k-images-idx3-ubyte.gz", MNIST_URL + "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
        RemoteFile("t10k-labels-idx1-ubyte.gz", MNIST_URL + "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
    ]
    return DatasetSpec("mnist", [str(i) for i in range(10)], 1, 28, files, None, _mnist_splits)


def _cifar_splits(raw_dir: Path, archive: str, tv_class_name: str) -> RawSplits:
    import torchvision.datasets as tvd

    base = getattr(tvd, tv_class_name)

    class VerifiedArchive(base):
        # The archive's md5 was already verified by classlab.data.download; torchvision's own
        # per-batch check would only repeat it (and reject a private mirror's re-packing).
        meta = {**base.meta, "md5": None}  # md5 None: torchvision only checks that the file exists

        def _check_integrity(self):
            return True

    extract_root = raw_dir / "torchvision"
    if not (extract_root / base.base_folder).is_dir():
        with tarfile.open(raw_dir / archive, "r:gz") as tar:
            tar.extractall(extract_root, filter="data")
    train = VerifiedArchive(extract_root, train=True, download=False)
    test = VerifiedArchive(extract_root, train=False, download=False)
    to_nchw = lambda a: np.ascontiguousarray(np.asarray(a, dtype=np.uint8).transpose(0, 3, 1, 2))  # noqa: E731
    return RawSplits(to_nchw(train.data), np.asarray(train.targets, dtype=np.int64),
                     to_nchw(test.data), np.asarray(test.targets, dtype=np.int64), list(train.classes))


def _cifar_class_names(n: int) -> list[str]:
    # placeholders until prepare reads the names from the archive's meta file
    return [f"class_{i:03d}" for i in range(n)]


@register_dataset("cifar10")
def cifar10() -> DatasetSpec:
    files = [RemoteFile("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                        "c58f30108f718f92721af3b95e74349a")]
    return DatasetSpec("cifar10", _cifar_class_names(10), 3, 32, files, None,
                       lambda raw: _cifar_splits(raw, "cifar-10-python.tar.gz", "CIFAR10"))


@register_dataset("cifar100")
def cifar100() -> DatasetSpec:
    files = [RemoteFile("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                        "eb9058c3a382ffc7106e4002c42a8d85")]
    return DatasetSpec("cifar100", _cifar_class_names(100), 3, 32, files, None,
                       lambda raw: _cifar_splits(raw, "cifar-100-python.tar.gz", "CIFAR100"))


# --- scikit-learn's bundled digits: no download, for fast tests ----------------------------

DIGITS_SPLIT_SEED = 0


def _digits_materialize(raw_dir: Path) -> None:
    from sklearn.datasets import load_digits

    from classlab.io import atomic_path

    digits = load_digits()
    target = raw_dir / "digits.npz"
    if target.exists():
        return
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, images=digits.images, target=digits.target)


def _digits_splits(raw_dir: Path) -> RawSplits:
    from sklearn.model_selection import train_test_split

    with np.load(raw_dir / "digits.npz") as z:
        images, target = z["images"], z["target"]
    # 0..16 intensities -> 0..255 so every dataset shares the uint8 pipeline
    x = np.clip(np.rint(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    y = target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y,
                                           random_state=DIGITS_SPLIT_SEED)
    return RawSplits(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


@register_dataset("digits")
def digits() -> DatasetSpec:
    return DatasetSpec("digits", [str(i) for i in range(10)], 1, 8, [], None, _digits_splits, _digits_materialize)


# --- mnist1d: procedural 1-D digits, generated by its package (never its download) ---------
#
# Greydanus, "Scaling down deep learning with MNIST-1D" (2020): each sample is a 40-point 1-D
# signal made from one of 10 digit templates by padding, shear, translation, correlated and iid
# noise. The package's ``make_dataset`` builds it from a seed with numpy alone; its
# ``get_dataset`` would fetch a pickle from a URL instead, and is never called here.
#
# The generator standardises the whole set (mean 0, std 1 over all values). The data layer stores
# uint8 images (N, C, H, W), so each signal becomes a (1, 1, 40) row after a fixed affine
# quantisation (written into the raw file too, so the file says how to undo it):
#     q = clip(round((x + MNIST1D_OFFSET) * MNIST1D_SCALE), 0, 255),  x ~= q / MNIST1D_SCALE - MNIST1D_OFFSET
# with [-6, 6] mapped onto 0..255 (21.25 levels per standard deviation, a step of 0.047 std).
# The default set spans about [-5.5, 4.5], so nothing is clipped; a flattening backbone
# (``deep_mlp``) reads the 40 features in order.

MNIST1D_OFFSET = 6.0
MNIST1D_SCALE = 255.0 / 12.0
MNIST1D_FILE = "mnist1d.npz"


def _mnist1d_materialize(raw_dir: Path) -> None:
    import json
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    from classlab.io import atomic_path

    target = raw_dir / MNIST1D_FILE
    if target.exists():
        return
    args = get_dataset_args()  # the package's defaults: 5,000 samples, 80/20 split, 40 points, seed 42
    # make_dataset seeds Python's and numpy's global generators; put the caller's states back
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    generator = {k: v for k, v in vars(args).items() if k != "url"}
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, x=data["x"], y=data["y"], x_test=data["x_test"], y_test=data["y_test"],
                     quant_offset=np.float64(MNIST1D_OFFSET), quant_scale=np.float64(MNIST1D_SCALE),
                     generator=np.array(json.dumps(generator, sort_keys=True)))


def _mnist1d_splits(raw_dir: Path) -> RawSplits:
    with np.load(raw_dir / MNIST1D_FILE) as z:
        offset, scale = float(z["quant_offset"]), float(z["quant_scale"])

        def quantise(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, dtype=np.float64)
            q = np.clip(np.rint((x + offset) * scale), 0, 255).astype(np.uint8)
            return q.reshape(len(x), 1, 1, x.shape[1])  # (N, 1, 1, 40): one grey row per signal

        return RawSplits(quantise(z["x"]), z["y"].astype(np.int64), quantise(z["x_test"]), z["y_test"].astype(np.int64))


@register_dataset("mnist1d")
def mnist1d() -> DatasetSpec:
    # size: the signal length (the stored images are 1 x 40, not square)
    return DatasetSpec("mnist1d", [str(i) for i in range(10)], 1, 40, [], None, _mnist1d_splits, _mnist1d_materialize)


# --- single-target scenes built from a base dataset (the explain family's localisation data) --

def _scene_spec(name: str, base: DatasetSpec, defaults: dict) -> DatasetSpec:
    from classlab.data.scenes import resolve_single_target_recipe

    r = resolve_single_target_recipe(None, base.num_classes, defaults)
    return DatasetSpec(name, [base.class_names[k] for k in r["target_classes"]], base.channels,
                       base.size * r["grid"], list(base.files), base.default_mirror, base.load_raw,
                       base.materialize, scene_base=base.name, scene_defaults=dict(defaults))


# scene dataset -> the dataset it is built from, readable without building a spec (building one
# imports torch; the workflow asks this while it builds the DAG)
SCENE_BASES = {"fashion_mnist_scenes": "fashion_mnist", "digits_scenes": "digits", "mnist_scenes": "mnist"}


# defaults sized for CPU; digits has 1,437 train and 360 test images, so its scenes reuse sources
@register_dataset("fashion_mnist_scenes")
def fashion_mnist_scenes() -> DatasetSpec:
    return _scene_spec("fashion_mnist_scenes", fashion_mnist(), {"n_train": 6000, "n_test": 1000})


@register_dataset("digits_scenes")
def digits_scenes() -> DatasetSpec:
    return _scene_spec("digits_scenes", digits(), {"n_train": 2000, "n_test": 500})


@register_dataset("mnist_scenes")
def mnist_scenes() -> DatasetSpec:
    return _scene_spec("mnist_scenes", mnist(), {"n_train": 6000, "n_test": 1000})


# --- attribute-object pairs built from a base dataset (the vlm family's compositional data) ----

def _pairs_spec(name: str, base: DatasetSpec, defaults: dict) -> DatasetSpec:
    from classlab.data.pairs import resolve_pairs_recipe

    r = resolve_pairs_recipe(None, base.class_names, defaults)
    return DatasetSpec(name, r["class_names"], 3, base.size, list(base.files), base.default_mirror, base.load_raw,
                       base.materialize, pairs_base=base.name, pairs_defaults=dict(defaults))


# pairs dataset -> the dataset it is built from, readable without building a spec
PAIRS_BASES = {"fashion_mnist_pairs": "fashion_mnist", "digits_pairs": "digits"}


# 4 colours x 10 objects = 40 pairs, 10 of them unseen (the recipe's defaults)
@register_dataset("fashion_mnist_pairs")
def fashion_mnist_pairs() -> DatasetSpec:
    return _pairs_spec("fashion_mnist_pairs", fashion_mnist(), {})


@register_dataset("digits_pairs")
def digits_pairs() -> DatasetSpec:
    return _pairs_spec("digits_pairs", digits(), {})


# --- long-tailed dense scenes built from a base dataset (the dense family's data) ----------------

def _dense_spec(name: str, base: DatasetSpec, defaults: dict) -> DatasetSpec:
    from classlab.data.dense_scenes import resolve_dense_recipe

    r = resolve_dense_recipe(None, base.class_names, defaults)
    return DatasetSpec(name, r["class_names"], 3, base.size * r["recipe"]["grid"], list(base.files),
                       base.default_mirror, base.load_raw, base.materialize, dense_base=base.name,
                       dense_defaults=dict(defaults))


# dense scene dataset -> the dataset it is built from, readable without building a spec
DENSE_BASES = {"fashion_mnist_lt_scenes": "fashion_mnist", "digits_lt_scenes": "digits"}


# 4 colours x 10 garments = 40 classes, exp long tail with imbalance ratio 100 (DENSE_RECIPE's defaults)
@register_dataset("fashion_mnist_lt_scenes")
def fashion_mnist_lt_scenes() -> DatasetSpec:
    return _dense_spec("fashion_mnist_lt_scenes", fashion_mnist(), {})


# digits has ~130 train images per class, so its head classes reuse sources; sized for fast tests
@register_dataset("digits_lt_scenes")
def digits_lt_scenes() -> DatasetSpec:
    return _dense_spec("digits_lt_scenes", digits(), {"imbalance_ratio": 20.0, "n_train": 400, "n_val": 100,
                                                      "n_test": 200})
