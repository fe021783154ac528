"""Times the training step (images/s, ms/step, peak memory) of our `maple`/`hisf` against MaPLe's eager fp16 formulation.

Usage (GPU, ViT-B/16 size with random weights):
    python benchmarks/train_step.py                      # batch 4 and 32 x 50/500/1000 classes
    python benchmarks/train_step.py --compile            # torch.compile the loss computation (train.compile)
    python benchmarks/train_step.py --compile reduce-overhead   # ... and CUDA graphs
    python benchmarks/train_step.py --shapes 4x50 32x500 --methods maple hisf --json rows.json
CPU smoke run (tiny model, what CI exercises):
    python benchmarks/train_step.py --tiny

`--methods` defaults to every registered prompt method but the baselines that have no multi-modal prompts
(zeroshot, coop). `--json` rewrites its file after every row, so a run stopped by a timeout keeps the rows
it finished (`complete` says whether it got to the end).

Ours runs the engine's own `train_step` (autocast + GradScaler on CUDA, backbone stored in half precision,
the text encoder truncated to the positions the prompts need). The reference is
`benchmarks/maple_reference.py`, MaPLe's CustomCLIP run eagerly with every weight in fp16 (what MaPLe's
code does with `PREC: fp16`), fed the same weights and prompts. Before timing, the first-step losses of
our `maple`, our eager fp32 path and the reference are printed on one batch so a speed-up never hides a
different computation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.maple_reference import ReferenceMaPLe  # noqa: E402
from hisf.model.backbone import load_backbone  # noqa: E402
from hisf.config import BackboneConfig, MethodConfig, TrainConfig  # noqa: E402
from hisf.engine.distributed import DistEnv  # noqa: E402
from hisf.engine import Precision, compile_losses, resolve_precision, seed_everything, train_step  # noqa: E402
from hisf.model.maple_import import maple_key_map  # noqa: E402
from hisf.model.facts import METHODS  # noqa: E402
from hisf.model.methods import build_method  # noqa: E402
from hisf.engine.optim import build_optimizer  # noqa: E402


# Baselines without multi-modal prompts: not what the comparison with MaPLe's formulation is about.
NOT_BENCHMARKED = ("zeroshot", "coop")


def prompt_methods() -> list[str]:
    """Every registered method with multi-modal prompts (maple, hisf and any added later)."""
    return [m for m in METHODS if m not in NOT_BENCHMARKED]


def parse_shape(text: str) -> tuple[int, int]:
    """`4x50` -> (batch 4, 50 classes)."""
    try:
        batch, classes = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes: {text!r} is not BATCHxCLASSES (e.g. 4x50)") from None
    if batch < 1 or classes < 2:
        raise argparse.ArgumentTypeError(f"--shapes: {text!r}: expected batch >= 1 and classes >= 2")
    return batch, classes


def classnames(n: int) -> list[str]:
    # Two-word names: a realistic name length for the text encoder (most datasets' names are 1-4 tokens).
    return [f"class {i}" for i in range(n)]


def _heads(block) -> int:
    return block.attn.num_heads


def build_ours(method: str, backbone, n_classes: int, device: torch.device, compile_: str | None, truncate: bool = True):
    # The method's default depth (MaPLe/HISF 9, HiCroPL 12 with k = 6), capped by the model's layers (hisf-tiny has 3).
    n_layers = min(backbone.text_layers, backbone.vision_layers)
    depth = min(MethodConfig(name=method).depth, n_layers)
    extra = {"cross_layer": min(6, depth - 1)} if method == "hicropl" else {}
    model = build_method(MethodConfig(name=method, depth=depth, **extra), backbone, classnames(n_classes))
    model.to(device).train()
    model.truncate_text = truncate
    opt = build_optimizer(TrainConfig(preset="paper", lr=1e-3), model.param_groups())
    params = [p for g in opt.param_groups for p in g["params"]]
    if compile_:
        torch._dynamo.reset()  # each row compiles afresh: no recompile limit across rows, no stale CUDA graphs
        compile_losses(model, compile_)  # what train.compile does in a trial
    return model, opt, params


def build_reference(ours_maple, backbone, n_classes: int, device: torch.device, half: bool):
    sd = ours_maple.trainable_state_dict()
    depth = len(ours_maple.layers)
    maple_sd = {theirs: sd[mine] for theirs, mine in maple_key_map(depth).items()}
    clip_sd = {k: v.float().cpu() for k, v in backbone.model.state_dict().items()}
    ref = ReferenceMaPLe(clip_sd, maple_sd, classnames(n_classes), backbone.tokenizer,
                         text_heads=_heads(backbone.model.transformer.resblocks[0]),
                         vision_heads=_heads(backbone.model.visual.transformer.resblocks[0]))
    trainable = {"ctx", "proj.weight", "proj.bias"}
    for name, p in ref.named_parameters():
        p.requires_grad_(name in trainable or name.startswith(("compound_prompts_text", "compound_prompt_projections")))
    ref.to(device)
    if half:
        ref.half()  # MaPLe's PREC fp16: the whole model, prompt learner included, in half precision
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=1e-3, momentum=0.9, weight_decay=5e-4)
    return ref, opt


def reference_step(ref, opt, images, labels) -> float:
    opt.zero_grad(set_to_none=True)
    logits = ref(images.to(next(ref.parameters()).dtype))
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    opt.step()
    return float(loss.item())


def timed(fn, warmup: int, steps: int, device: torch.device) -> tuple[float, float, float]:
    """(ms per step, peak GPU MiB or 0 on CPU, first step's loss) over `steps` steps after `warmup`."""
    first = None
    for _ in range(warmup):
        loss = fn()
        first = loss if first is None else first
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ms = (time.perf_counter() - t0) * 1000 / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return ms, peak, first


def loss_check(backbone_fp32, n_classes: int, batch: int, device: torch.device, image_size: int) -> dict[str, float]:
    """First-step losses on one batch: our maple (fast text path), our eager fp32 path, MaPLe's reference (fp32)."""
    seed_everything(0)
    model, _, _ = build_ours("maple", backbone_fp32, n_classes, device, compile_=None, truncate=True)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    labels = torch.randint(0, n_classes, (batch,), device=device)
    with torch.no_grad():
        fast = model.forward_losses(images, labels)["loss"].item()
        model.truncate_text = False
        eager = model.forward_losses(images, labels)["loss"].item()
        ref, _ = build_reference(model, backbone_fp32, n_classes, device, half=False)
        reference = F.cross_entropy(ref(images), labels).item()
    return {"ours_fast": fast, "ours_eager_77": eager, "maple_reference": reference}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="hisf-tiny model on CPU (smoke run; numbers mean nothing)")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--methods", nargs="+", default=None, choices=sorted(METHODS),
                   help=f"our methods to time (default: {' '.join(prompt_methods())})")
    p.add_argument("--batches", nargs="+", type=int, default=None)
    p.add_argument("--classes", nargs="+", type=int, default=None)
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=None, metavar="BxC",
                   help="explicit (batch x classes) pairs instead of --batches x --classes, e.g. 4x50 32x500")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile our loss computation (train.compile), optionally with a mode")
    p.add_argument("--no-reference", action="store_true", help="skip MaPLe's reference formulation")
    p.add_argument("--no-loss-check", action="store_true", help="skip the fp32 first-step loss comparison")
    p.add_argument("--json", help="write the rows to this file (rewritten after every row)")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    methods = args.methods or prompt_methods()
    if args.shapes:
        shapes = list(args.shapes)
    else:
        batches = args.batches or ([4] if args.tiny else [4, 32])
        n_classes = args.classes or ([50] if args.tiny else [50, 500, 1000])
        shapes = [(b, c) for b in batches for c in n_classes]
    steps = args.steps or (3 if args.tiny else 50)
    warmup = args.warmup or (1 if args.tiny else 10)
    name = "hisf-tiny" if args.tiny else "ViT-B-16"
    cuda = device.type == "cuda"
    mode = args.compile or "eager"
    if not cuda:
        print("note: no CUDA device; CPU numbers are a smoke test, not the benchmark", file=sys.stderr)
    report = {"bench": "train_step", "device": str(torch.cuda.get_device_name(device) if cuda else "cpu"),
              "torch": torch.__version__, "model": name, "mode": mode, "steps": steps, "warmup": warmup,
              "methods": methods, "loss_checks": [], "rows": [], "complete": False}

    def save() -> None:
        if args.json:
            tmp = Path(args.json).with_suffix(".tmp")
            tmp.write_text(json.dumps(report, indent=2))
            tmp.replace(args.json)

    save()
    if not args.no_loss_check:
        # fp32, one batch per class count: our fast text path, our full-length path and MaPLe's reference.
        seed_everything(0)
        backbone32 = load_backbone(BackboneConfig(name=name, pretrained=None, precision="fp32"))
        backbone32.model.to(device)
        batch0 = shapes[0][0]
        for c in sorted({c for _, c in shapes}):
            check = {"batch": batch0, "classes": c, **loss_check(backbone32, c, batch0, device, backbone32.image_size)}
            report["loss_checks"].append(check)
            print(f"first-step loss, maple, batch {batch0}, {c} classes: "
                  + ", ".join(f"{k} {v:.6f}" for k, v in check.items() if k not in ("batch", "classes")))
        report["loss_check"] = report["loss_checks"][0]  # the first shape's check, under its historical key
        save()
        del backbone32

    seed_everything(0)
    storage = "fp16" if cuda else "fp32"
    backbone = load_backbone(BackboneConfig(name=name, pretrained=None, precision=storage))
    backbone.model.to(device)
    precision = resolve_precision("fp16" if cuda else "fp32", device)
    env = DistEnv(0, 1, 0, device, owns_group=False)
    size = backbone.image_size

    def add(row: dict) -> None:
        row["images_per_s"] = row["batch"] * 1000 / row["ms_per_step"]
        report["rows"].append(row)
        save()
        speedup = row.get("speedup_vs_reference", 1.0)
        print(f"{row['formulation']:<26}{row['batch']:>6}{row['classes']:>8}{row['ms_per_step']:>10.2f}"
              f"{row['images_per_s']:>10.1f}{row['peak_mib']:>10.0f}{'-' if speedup is None else f'{speedup:.2f}':>8}"
              f"{row['first_loss']:>10.4f}", flush=True)

    print(f"mode {mode}, {steps} steps after {warmup} warm-up, {report['device']}")
    print(f"{'formulation':<26}{'batch':>6}{'classes':>8}{'ms/step':>10}{'img/s':>10}{'peak MiB':>10}{'x ref':>8}{'loss':>10}")
    for batch, c in shapes:
        images = torch.randn(batch, 3, size, size, device=device)
        labels = torch.randint(0, c, (batch,), device=device)
        ref_ms = None
        if not args.no_reference:
            seed_everything(0)
            maple, _, _ = build_ours("maple", backbone, c, device, compile_=None)
            ref, ref_opt = build_reference(maple, backbone, c, device, half=cuda)
            del maple
            if cuda:
                torch.cuda.empty_cache()
            ref_ms, peak, first = timed(lambda: reference_step(ref, ref_opt, images, labels), warmup, steps, device)
            add({"kind": "reference", "method": "maple", "mode": "eager",
                 "formulation": "maple_reference_fp16" if cuda else "maple_reference_fp32", "precision": storage,
                 "batch": batch, "classes": c, "ms_per_step": ref_ms, "peak_mib": peak, "first_loss": first})
            del ref, ref_opt
        for method in methods:
            if cuda:
                torch.cuda.empty_cache()
            seed_everything(0)
            model, opt, params = build_ours(method, backbone, c, device, args.compile)
            prec = Precision(precision.name, precision.device_type, precision.dtype,
                             torch.amp.GradScaler(device.type) if precision.scaler is not None else None)
            ms, peak, first = timed(lambda: train_step(model, images, labels, opt, prec, params, env).losses["loss"],
                                    warmup, steps, device)
            suffix = "" if mode == "eager" else f"_{mode}"
            add({"kind": "ours", "method": method, "mode": mode, "formulation": f"ours_{method}_{prec.name}{suffix}",
                 "precision": prec.name, "batch": batch, "classes": c, "ms_per_step": ms, "peak_mib": peak,
                 "first_loss": first, "speedup_vs_reference": ref_ms / ms if ref_ms else None})
            del model, opt, params
        if cuda:
            torch.cuda.empty_cache()
    report["complete"] = True
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
