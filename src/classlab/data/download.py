"""Checksummed, atomic download of raw dataset files.

A file is taken from a local mirror directory when it is there (Debian's
``dataset-fashion-mnist`` package is such a mirror) and from its URL otherwise. Either way
its md5 is checked before it is renamed into place, so a corrupted or truncated file never
lands under ``data/``.
"""
from __future__ import annotations

import gzip
import hashlib
import shutil
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from classlab.io import atomic_path


class ChecksumError(RuntimeError):
    """A downloaded or mirrored file does not match its published checksum."""


@dataclass(frozen=True)
class RemoteFile:
    """One raw file of a dataset: where it lives and how to recognise it.

    ``md5`` is the published checksum of the file as distributed. ``payload_md5`` is the
    checksum of the decompressed content of a ``.gz`` file; it lets a mirror that
    recompressed the same bytes (Debian does) be verified too.
    """

    name: str
    url: str
    md5: str
    payload_md5: str | None = None
    extra_urls: tuple[str, ...] = field(default_factory=tuple)


def md5_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _gunzip_md5(path: Path, chunk: int = 1 << 20) -> str | None:
    digest = hashlib.md5()
    try:
        with gzip.open(path, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    except (OSError, EOFError):
        return None  # truncated or not gzip at all
    return digest.hexdigest()


def verify(path: Path, remote: RemoteFile) -> None:
    """Raise ChecksumError naming the file unless its content matches the published sums."""
    got = md5_of(path)
    if got == remote.md5:
        return
    if remote.payload_md5 is not None and _gunzip_md5(path) == remote.payload_md5:
        return
    raise ChecksumError(
        f"checksum mismatch for {remote.name}: md5 {got}, expected {remote.md5}"
        + (f" (or decompressed payload md5 {remote.payload_md5})" if remote.payload_md5 else "")
        + "; the file is corrupted or truncated and was not kept"
    )


def fetch(remote: RemoteFile, dest_dir: Path, mirror: Path | None = None, timeout: float = 60.0) -> Path:
    """Place ``remote`` in ``dest_dir``, verified. Returns the final path.

    An already present file that verifies is kept; one that does not is replaced.
    """
    dest_dir = Path(dest_dir)
    dest = dest_dir / remote.name
    if dest.exists():
        try:
            verify(dest, remote)
            return dest
        except ChecksumError:
            dest.unlink()
    with atomic_path(dest) as tmp:
        source = None if mirror is None else Path(mirror) / remote.name
        if source is not None and source.exists():
            shutil.copyfile(source, tmp)
        else:
            _http_get([remote.url, *remote.extra_urls], tmp, timeout)
        verify(tmp, remote)  # raises before the rename: nothing partial is left
    return dest


def _http_get(urls: list[str], out: Path, timeout: float) -> None:
    errors = []
    for url in urls:
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "classlab"})
            with urllib.request.urlopen(request, timeout=timeout) as response, open(out, "wb") as fh:
                shutil.copyfileobj(response, fh)
            return
        except OSError as exc:  # URLError and socket errors are OSErrors
            errors.append(f"{url}: {exc}")
    raise ConnectionError("could not download " + "; ".join(errors))
