"""Align rules vs the authors' formulas (Boopathy & Fiete, FieteLab/Wide-Network-Alignment).

Three measurements on the ``align-width-conv`` network (NTK conv 16,16 + affine-free batch norm,
ReLU, 2×2 max-pool, Fashion-MNIST 3 000 examples, SGD lr 1, shifted one-hot MSE, batch 100):

1. **Updates.** The authors build Align-ada and Align-zero with stop-gradients (TensorFlow 1): a
   linearised copy whose input at each mixing point is x_lin + x − sg(x), a real network whose
   layers see sg(x), and the loss L(f + f_lin − sg(f_lin)). That construction is re-expressed
   here in PyTorch (detach = sg) on our model and compared, on the same batch after some BP-free
   training, with our rules' ``.grad`` (max relative difference per parameter). Two placements of
   the mixing points: after every batch norm (what our ``align-ada`` computes), and the authors'
   literal one, where the last conv is mixed at the readout's input, i.e. after the real ReLU and
   pool.
2. **Alignment score.** After 60 BP steps with the alignment probe: our exact operator score of
   each conv, the flattened-kernel score it replaces, our 100-probe estimate, and the authors'
   estimator (100 batches × 100 Gaussian probes through conv and transposed conv, each batch
   rescaled by its mean |·|, ratio of sums).
3. **Batch-norm mixing.** Align-ada trained with the default (real network's batch norm); at
   steps 1…60 the relative difference ‖ΔW_real − ΔW_twin‖/‖ΔW_real‖ per conv layer against the
   twin-statistics option on the same batch.

    python benchmarks/bench_align_fidelity.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

import decorrelate.rules.align  # noqa: F401  (registers the align rules)
from decorrelate import Loss, build_model, get_rule
from decorrelate.align import AlignmentProbe
from decorrelate.data import load_dataset
from decorrelate.metrics import ConvGeometry, alignment_score, kernel_alignment_score


def batches(data, batch_size: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(data.train), generator=gen)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            yield data.train.x[idx], data.train.y[idx]


def authors_construction(
    model: nn.Sequential, twin: nn.Sequential, loss: Loss, x: Tensor, y: Tensor, mix_after, zero
):
    """The authors' stop-gradient graph on our Sequential: grads of real (ada) or twin (zero)."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in twin.named_parameters()}
    buffers = dict(twin.named_buffers())
    real_params = [p for p in model.parameters()]
    xr, xl = x, x
    for i, (m, m0) in enumerate(zip(model, twin, strict=True)):
        prefix = f"{i}."
        local = {
            k[len(prefix) :]: v for k, v in {**params, **buffers}.items() if k.startswith(prefix)
        }
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            xr = m(xr.detach())  # the real layer sees sg(x)
        elif isinstance(m, _BatchNorm):  # real batch statistics, running ones left alone
            xr = F.batch_norm(xr, None, None, m.weight, m.bias, True, 0.0, m.eps)
        else:
            xr = m(xr)
        xl = functional_call(m0, local, (xl,)) if local else m0(xl)
        if i in mix_after:
            xl = xl + (xr - xr.detach())  # exactly xl in value (ties in max-pool stay put)
    out = (xr.detach() if zero else xr) + xl - xl.detach()
    value = loss(out, y)
    targets = list(params.values()) if zero else real_params
    got = torch.autograd.grad(value, targets, allow_unused=True)
    names = [n for n, _ in model.named_parameters()]
    return {n: g for n, g in zip(names, got, strict=True) if g is not None}


def rel_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, float]:
    """Per layer, ‖a − b‖ / ‖a‖ over its weight and bias together.

    (The bias of a conv followed by batch norm gets a zero update up to rounding, so it is not
    compared on its own.)
    """
    layers = sorted({n.rsplit(".", 1)[0] for n in a}, key=lambda n: int(n) if n.isdigit() else n)
    out = {}
    for layer in layers:
        names = [n for n in a if n.rsplit(".", 1)[0] == layer]
        va = torch.cat([a[n].flatten() for n in names])
        vb = torch.cat([b[n].flatten() for n in names])
        out[layer] = float((va - vb).norm() / va.norm().clamp_min(1e-30))
    return out


def rule_grads(rule, model, x, y) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    rule.backward(model, x, y)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def authors_score(dw: Tensor, dw_hat: Tensor, geom: ConvGeometry, gen, iters=100, batch=100):
    """The authors' alignment estimator (alignment_cifar.py ``align``), re-expressed in torch."""
    wd = ww = dd = 0.0
    c_out = dw.shape[0]
    for _ in range(iters):
        v = torch.randn(batch, dw.shape[1], *geom.input_size, generator=gen, dtype=dw.dtype)
        bw = geom.adjoint(geom.apply(v, dw), dw) / c_out
        bb = geom.adjoint(geom.apply(v, dw_hat), dw_hat) / c_out
        bw, bb = bw / bw.abs().mean(), bb / bb.abs().mean()
        wd += float((bw * bb).flatten(1).sum(1).mean())
        ww += float((bw * bw).flatten(1).sum(1).mean())
        dd += float((bb * bb).flatten(1).sum(1).mean())
    return wd / (ww * dd) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/align_fidelity.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load_dataset("fashion-mnist", train_size=3000)
    loss = Loss("mse-shifted")
    results: dict = {"width": args.width, "steps": args.steps}

    def fresh(seed=0):
        torch.manual_seed(seed)
        return build_model(
            "convnet-ntk",
            data.input_shape,
            10,
            widths=[],
            channels=[args.width] * 2,
            activation="relu",
        ).double()

    # 1 + 3. align-ada / align-zero updates after training with align-ada (real BN mixing)
    model = fresh()
    ada, ada_twin, zero = (
        get_rule("align-ada"),
        get_rule("align-ada", bn_mixing="twin"),
        get_rule("align-zero"),
    )
    for rule in (ada, ada_twin, zero):
        rule.attach(model, loss)
    convs = [n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.ndim == 4]
    bns = [i for i, m in enumerate(model) if isinstance(m, _BatchNorm)]
    flatten = next(i for i, m in enumerate(model) if isinstance(m, nn.Flatten))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    drift = []
    stream = batches(data, 100, seed=0)
    for step in range(1, args.steps + 1):
        x, y = next(stream)
        x = x.double()
        if step in (1, 2, 5, 10, 20, 40, args.steps):
            real_g, twin_g = rule_grads(ada, model, x, y), rule_grads(ada_twin, model, x, y)
            diff = rel_diff(real_g, twin_g)
            drift.append({"step": step, **{n: diff[n] for n in convs}})
        opt.zero_grad(set_to_none=True)
        ada.backward(model, x, y)
        opt.step()
    results["bn_mixing_rel_diff"] = drift
    x, y = next(stream)
    x = x.double()
    ours = {"align-ada": rule_grads(ada, model, x, y), "align-zero": rule_grads(zero, model, x, y)}
    placements = {"after every BN": set(bns), "authors' literal": {*bns[:-1], flatten}}
    results["vs_authors_construction"] = {
        f"{name} / mix {where}": rel_diff(
            ours[name],
            authors_construction(model, ada.twin, loss, x, y, mix, zero=name == "align-zero"),
        )
        for name in ours
        for where, mix in placements.items()
    }

    # 2. alignment score of BP training, 60 steps, with the probe
    model = fresh()
    probe = AlignmentProbe()
    probe.attach(model, loss)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    stream = batches(data, 100, seed=0)
    for _ in range(args.steps):
        x, y = next(stream)
        opt.zero_grad(set_to_none=True)
        probe.backward(model, x.double(), y)
        opt.step()
    geometry = probe.geometry()
    gen = torch.Generator().manual_seed(0)
    scores = {}
    for name, (dw, dw_hat) in probe.changes().items():
        if name not in geometry:
            continue
        geom = geometry[name]
        scores[name] = {
            "operator (exact)": alignment_score(dw, dw_hat, geometry=geom),
            "operator (100 probes)": alignment_score(
                dw, dw_hat, geometry=geom, probes=100, generator=gen
            ),
            "authors' estimator": authors_score(dw.double(), dw_hat.double(), geom, gen),
            "flattened kernel": kernel_alignment_score(dw, dw_hat),
        }
    results["alignment_score"] = scores
    results["seconds"] = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
