"""The download code: checksums, atomic writes, local mirrors, and the torchvision-backed
datasets served from a loopback HTTP server."""
import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from classlab.data.download import ChecksumError, RemoteFile, fetch
from classlab.data.registry import FASHION_MNIST_MIRROR, get_dataset


@pytest.fixture
def http_root(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 for the test's duration."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_fetch_verifies_and_places_file(http_root, tmp_path):
    root, url = http_root
    (root / "a.bin").write_bytes(b"hello" * 100)
    out = fetch(RemoteFile("a.bin", url + "a.bin", md5(b"hello" * 100)), tmp_path / "raw")
    assert out.read_bytes() == b"hello" * 100


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_bad_download_names_the_file_and_leaves_nothing(http_root, tmp_path, damage):
    root, url = http_root
    good = bytes(range(256)) * 64
    bad = good[:1000] if damage == "truncate" else good[:-1] + b"\x00"
    (root / "data.gz").write_bytes(bad)
    dest = tmp_path / "raw"
    with pytest.raises(ChecksumError, match="data.gz"):
        fetch(RemoteFile("data.gz", url + "data.gz", md5(good)), dest)
    assert list(dest.iterdir()) == []  # no partial file, no temp file


def test_mirror_is_preferred_over_url(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "f.txt").write_bytes(b"x")
    # the URL points nowhere: success proves the mirror was used
    out = fetch(RemoteFile("f.txt", "http://127.0.0.1:9/none", md5(b"x")), tmp_path / "raw", mirror)
    assert out.read_bytes() == b"x"


def _fake_cifar10_archive() -> bytes:
    """A CIFAR-10 python archive in the official layout with 3 images per batch."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, obj):
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        add("batches.meta", {"label_names": names})
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            add(name, {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [1, 2, 3]})
    return buf.getvalue()


def test_cifar10_through_loopback_server(http_root, tmp_path):
    root, url = http_root
    archive = _fake_cifar10_archive()
    (root / "cifar-10-python.tar.gz").write_bytes(archive)
    spec = get_dataset("cifar10")
    spec = spec.with_files([RemoteFile("cifar-10-python.tar.gz", url + "cifar-10-python.tar.gz", md5(archive))])
    raw = tmp_path / "raw"
    spec.download(raw)
    splits = spec.load_raw(raw)
    assert splits.train_x.shape == (15, 3, 32, 32) and splits.test_x.shape == (3, 3, 32, 32)
    assert splits.train_x.dtype == np.uint8 and splits.class_names[0] == "airplane"
    assert splits.train_y.tolist() == [1, 2, 3] * 5


def test_mnist_through_loopback_server(http_root, tmp_path):
    import gzip

    root, url = http_root
    rng = np.random.default_rng(0)
    files = []
    for prefix, n in (("train", 6), ("t10k", 4)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, arr, header in (("images-idx3", images, [0, 0, 8, 3, n, 28, 28]),
                                  ("labels-idx1", labels, [0, 0, 8, 1, n])):
            head = bytes(header[:4]) + b"".join(int(d).to_bytes(4, "big") for d in header[4:])
            data = gzip.compress(head + arr.tobytes())
            name = f"{prefix}-{kind}-ubyte.gz"
            (root / name).write_bytes(data)
            files.append(RemoteFile(name, url + name, md5(data)))
    spec = get_dataset("mnist").with_files(files)
    raw = tmp_path / "raw"
    spec.download(raw)
    splits = spec.load_raw(raw)
    assert splits.train_x.shape == (6, 1, 28, 28) and splits.test_y.shape == (4,)


def test_fashion_mnist_debian_mirror_verifies_by_payload(tmp_path):
    from tests.conftest import require_system_dependency

    require_system_dependency(Path(FASHION_MNIST_MIRROR).is_dir(), "Debian's dataset-fashion-mnist")
    spec = get_dataset("fashion_mnist")
    raw = tmp_path / "raw"
    spec.download(raw)
    splits = spec.load_raw(raw)
    assert splits.train_x.shape == (60000, 1, 28, 28) and splits.test_x.shape == (10000, 1, 28, 28)
    assert np.bincount(splits.train_y).tolist() == [6000] * 10
