"""What R costs in memory: state_dict bytes of a model, plain and decorrelated (full R, default).

Counts the bytes of every tensor in ``state_dict()`` (numel × element size): the parameters and
buffers a checkpoint holds. The decorrelated model adds R and its statistics buffers (the
``running_var`` of the learned rules and the 512-row ``stats_rows`` ring buffer of recent
inputs that :meth:`Decorrelator.stats` reads). Models are built on the ``meta`` device, so
nothing is allocated and a ResNet-18 with a full R (≈ 480 MB) is measured in milliseconds; the
counts are exact (shapes and dtypes only). ``--check`` also builds them on CPU and compares the
byte counts of a real ``torch.save`` file.

    python benchmarks/bench_r_memory.py [--method scaled] [--check]

The ResNet-18 is built here (the zoo's BasicBlock, ImageNet stem, 1000 classes: 11.7 M
parameters, the torchvision layout) so that no torchvision is needed.
"""

from __future__ import annotations

import argparse
import io
import warnings
from collections.abc import Callable

import torch
from torch import nn

from decorrelate.models import MLP, ConvNet
from decorrelate.nn import decorrelate, decorrelators
from decorrelate.zoo import BasicBlock


def resnet18(num_classes: int = 1000, device=None) -> nn.Module:
    """ResNet-18 (He et al. 2016), torchvision's layout: 11 689 512 parameters (the zoo's
    :class:`~decorrelate.zoo.BasicBlock` behind the ImageNet stem)."""
    with torch.device(device or "cpu"):
        layers: list[nn.Module] = [
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        ]
        c = 64
        for width, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [BasicBlock(c, width, stride), BasicBlock(width, width, 1)]
            c = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
        return nn.Sequential(*layers)


def mnist_mlp(device=None) -> nn.Module:
    with torch.device(device or "cpu"):
        return MLP((1, 28, 28), 10)


def mnist_convnet(device=None) -> nn.Module:
    with torch.device(device or "cpu"):
        return ConvNet((1, 28, 28), 10)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "MLP 784-1000×3-10 (MNIST)": mnist_mlp,
    "conv net 32,32,64,64-1000-10 (MNIST)": mnist_convnet,
    "ResNet-18 (ImageNet, 1000 classes)": resnet18,
}


def nbytes(model: nn.Module, only: Callable[[str], bool] = lambda name: True) -> int:
    return sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if only(n))


def state_bytes(build: Callable[..., nn.Module], device="meta", method: str = "scaled") -> dict:
    """Bytes of ``state_dict()``: plain ("none"), decorrelated with a full R everywhere
    ("full", ``block_above=None``), with the default block-diagonal R ("default") and with
    ``block_size=1024`` ("b1024"), R's own share of each ("full_R", ...) and the layouts."""
    out = {"none": nbytes(build(device=device))}
    variants = [("full", {"block_above": None}), ("default", {}), ("b1024", {"block_size": 1024})]
    for label, options in variants:
        model = build(device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # batch norms etc. are not layers to decorrelate
            decorrelate(model, method, **options)
        out[label] = nbytes(model)
        out[label + "_R"] = nbytes(model, lambda n: n.endswith(".R"))
        out[label + "_layouts"] = sorted(
            {(w.in_features, w.blocks, w.block) for _, w in decorrelators(model)}
        )
    return out


def saved_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="scaled")
    parser.add_argument("--check", action="store_true", help="also torch.save real models")
    args = parser.parse_args()
    mb = 1e6
    print(
        "| model | params + buffers MB | + R full MB (of which R) | + R default MB (of which R) "
        "| + R block_size=1024 MB (of which R) | layers split by default (fan-in → blocks × size) |"
    )
    print("|---|---|---|---|---|---|")
    for name, build in MODELS.items():
        s = state_bytes(build, method=args.method)
        split = [f"{d} → {k}×{b}" for d, k, b in s["default_layouts"] if k > 1]
        print(
            f"| {name} | {s['none'] / mb:.1f} | +{(s['full'] - s['none']) / mb:.1f} "
            f"({s['full_R'] / mb:.1f}) | +{(s['default'] - s['none']) / mb:.1f} "
            f"({s['default_R'] / mb:.1f}) | +{(s['b1024'] - s['none']) / mb:.1f} "
            f"({s['b1024_R'] / mb:.1f}) | {', '.join(split) or 'none'} |"
        )
        if args.check:
            model = build(device="cpu")
            decorrelate(model, args.method)
            real = saved_bytes(model)
            print(f"    check: torch.save of the default-decorrelated model = {real / mb:.1f} MB")


if __name__ == "__main__":
    main()
