"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package, and timm models trained on it here, so
that compression benchmarks see trained-looking weights and real activations without a download.

    apt-get install dataset-fashion-mnist     # /usr/share/datasets/fashion-mnist/*-ubyte.gz

Trained weights are cached (safetensors) under benchmarks/.cache/, which git ignores.
"""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATA = Path("/usr/share/datasets/fashion-mnist")
CACHE = Path(__file__).resolve().parent / ".cache"
MEAN, STD = 0.286, 0.353


def available() -> bool:
    return (DATA / "train-images-idx3-ubyte.gz").exists()


def require() -> None:
    if not available():
        raise SystemExit(
            f"Fashion-MNIST is not installed ({DATA} is missing): apt-get install dataset-fashion-mnist"
        )


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 N x 28 x 28, labels int64 N) of 'train' (60k) or 't10k' (10k)."""
    require()
    with gzip.open(DATA / f"{split}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(DATA / f"{split}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_input(images: torch.Tensor, size: int, channels: int = 3) -> torch.Tensor:
    """uint8 N x 28 x 28 -> normalized float N x channels x size x size."""
    x = (images.float() / 255 - MEAN) / STD
    x = F.interpolate(x[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, channels, -1, -1).contiguous()


def make_model(name: str, size: int) -> torch.nn.Module:
    import timm

    kwargs = {"img_size": size} if name.startswith(("vit", "deit")) else {}
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def trained_model(
    name: str, size: int, steps: int = 300, batch: int = 64, lr: float = 1e-3, seed: int = 0, log=print
) -> torch.nn.Module:
    """`name` (timm, 10 classes, input size x size) trained `steps` AdamW steps on the training split;
    cached by (name, size, steps, batch, lr, seed)."""
    from safetensors.torch import load_file, save_file

    path = CACHE / f"{name}_fmnist_{size}px_{steps}x{batch}_lr{lr:g}_s{seed}.safetensors"
    torch.manual_seed(seed)
    model = make_model(name, size)
    if path.exists():
        model.load_state_dict(load_file(path))
        return model.eval()
    images, labels = load("train")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        index = torch.randint(len(images), (batch,), generator=generator)
        x = to_input(images[index], size)
        if torch.rand((), generator=generator) < 0.5:
            x = x.flip(-1)
        loss = F.cross_entropy(model(x), labels[index], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            log(
                f"  {name}: step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)"
            )
    model.eval()
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, batch: int = 250) -> float:
    correct = sum(
        (model(chunk).argmax(1) == y).sum().item() for chunk, y in zip(x.split(batch), labels.split(batch))
    )
    return correct / len(labels)
