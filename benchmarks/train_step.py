"""Times the training step (images/s, ms/step, peak memory) of our `maple`/`hisf` against MaPLe's eager fp16 formulation.

Usage (GPU, ViT-B/16 size with random weights):
    python benchmarks/train_step.py                      # batch 4 and 32 x 50/500/1000 classes
    python benchmarks/train_step.py --compile            # torch.compile the loss computation (train.compile)
    python benchmarks/train_step.py --compile reduce-overhead   # ... and CUDA graphs
CPU smoke run (tiny model, what CI exercises):
    python benchmarks/train_step.py --tiny

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
from hisf.model.maple_checkpoint import maple_key_map  # noqa: E402
from hisf.model.methods import build_method  # noqa: E402
from hisf.engine.optim import build_optimizer  # noqa: E402


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


def timed(fn, warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(ms per step, peak GPU MiB or 0 on CPU) over `steps` steps after `warmup`."""
    for _ in range(warmup):
        fn()
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
    return ms, peak


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
    p.add_argument("--methods", nargs="+", default=["maple", "hisf"])
    p.add_argument("--batches", nargs="+", type=int, default=None)
    p.add_argument("--classes", nargs="+", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile our loss computation (train.compile), optionally with a mode")
    p.add_argument("--no-reference", action="store_true", help="skip MaPLe's reference formulation")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    batches = args.batches or ([4] if args.tiny else [4, 32])
    n_classes = args.classes or ([50] if args.tiny else [50, 500, 1000])
    steps = args.steps or (3 if args.tiny else 50)
    warmup = args.warmup or (1 if args.tiny else 10)
    name = "hisf-tiny" if args.tiny else "ViT-B-16"
    cuda = device.type == "cuda"
    if not cuda:
        print("note: no CUDA device; CPU numbers are a smoke test, not the benchmark", file=sys.stderr)

    seed_everything(0)
    storage = "fp16" if cuda else "fp32"
    backbone = load_backbone(BackboneConfig(name=name, pretrained=None, precision=storage))
    backbone.model.to(device)
    precision = resolve_precision("fp16" if cuda else "fp32", device)
    env = DistEnv(0, 1, 0, device, owns_group=False)
    size = backbone.image_size

    seed_everything(0)
    backbone32 = load_backbone(BackboneConfig(name=name, pretrained=None, precision="fp32"))
    backbone32.model.to(device)
    check = loss_check(backbone32, n_classes[0], batches[0], device, size)
    print(f"first-step loss, maple, batch {batches[0]}, {n_classes[0]} classes: " + ", ".join(f"{k} {v:.6f}" for k, v in check.items()))
    del backbone32

    rows = []
    header = f"{'formulation':<22}{'batch':>6}{'classes':>8}{'ms/step':>10}{'img/s':>10}{'peak MiB':>10}{'x ref':>8}"
    print(header)
    for batch in batches:
        for c in n_classes:
            images = torch.randn(batch, 3, size, size, device=device)
            labels = torch.randint(0, c, (batch,), device=device)
            ref_ms = None
            if not args.no_reference:
                seed_everything(0)
                maple, _, _ = build_ours("maple", backbone, c, device, compile_=None)
                ref, ref_opt = build_reference(maple, backbone, c, device, half=cuda)
                del maple
                ref_ms, peak = timed(lambda: reference_step(ref, ref_opt, images, labels), warmup, steps, device)
                rows.append({"formulation": "maple_reference_fp16" if cuda else "maple_reference_fp32", "batch": batch,
                             "classes": c, "ms_per_step": ref_ms, "images_per_s": batch * 1000 / ref_ms, "peak_mib": peak})
                print(f"{rows[-1]['formulation']:<22}{batch:>6}{c:>8}{ref_ms:>10.2f}{batch * 1000 / ref_ms:>10.1f}{peak:>10.0f}{1.0:>8.2f}")
                del ref, ref_opt
            for method in args.methods:
                seed_everything(0)
                model, opt, params = build_ours(method, backbone, c, device, args.compile)
                prec = Precision(precision.name, precision.device_type, precision.dtype,
                                 torch.amp.GradScaler(device.type) if precision.scaler is not None else None)
                ms, peak = timed(lambda: train_step(model, images, labels, opt, prec, params, env), warmup, steps, device)
                ratio = ref_ms / ms if ref_ms else float("nan")
                rows.append({"formulation": f"ours_{method}_{prec.name}", "batch": batch, "classes": c, "ms_per_step": ms,
                             "images_per_s": batch * 1000 / ms, "peak_mib": peak, "speedup_vs_reference": ratio})
                print(f"{rows[-1]['formulation']:<22}{batch:>6}{c:>8}{ms:>10.2f}{batch * 1000 / ms:>10.1f}{peak:>10.0f}{ratio:>8.2f}")
                del model, opt, params
            if cuda:
                torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(torch.cuda.get_device_name(device) if cuda else "cpu"),
                                               "loss_check": check, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
