"""The weights' checksum stored in a `.dag` file: SHA-256 over 4 MiB pieces hashed on a thread pool, and
the single digest of older files (still checked on load)."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import torch

_PIECE = 1 << 22  # bytes per separately hashed piece of a tensor
PIECED = "sha256/4MiB:"


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """The weights' checksum as `save` writes it: SHA-256 over the tensors sorted by name, of each one's
    name, dtype and shape, then of the SHA-256 of each 4 MiB piece of its bytes; the pieces are hashed on
    a thread pool (hashlib lets go of the GIL), so a large model checks at several cores' speed."""
    entries = [(key, tensors[key], _bytes_of(tensors[key])) for key in sorted(tensors)]
    pieces = [piece for _, _, data in entries for piece in split_bytes(data, _PIECE)]
    workers = min(8, os.cpu_count() or 1, len(pieces))
    if workers > 1 and sum(len(data) for _, _, data in entries) > 4 * _PIECE:
        with ThreadPoolExecutor(workers) as pool:
            digests = iter(list(pool.map(_sha256, pieces)))
    else:
        digests = map(_sha256, pieces)
    digest = hashlib.sha256()
    for key, tensor, data in entries:
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        for _ in range(0, len(data), _PIECE):
            digest.update(next(digests))
    return PIECED + digest.hexdigest()


def whole_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """The checksum of files saved before `checksum`'s pieces: one SHA-256 over every name, dtype, shape
    and byte (still checked on load)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(f"{key}|{tensors[key].dtype}|{tuple(tensors[key].shape)}|".encode())
        digest.update(_bytes_of(tensors[key]))
    return digest.hexdigest()


def split_bytes(data: bytes | memoryview, size: int) -> list[memoryview]:
    """`data` in pieces of `size` bytes (the last one shorter), as views."""
    view = memoryview(data)
    return [view[i : i + size] for i in range(0, len(view), size)]


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data


def _sha256(data: memoryview) -> bytes:
    return hashlib.sha256(data).digest()
