"""Times trial fusion (docs/fusion.md): member-steps per second of K members fused in one model against the same K
trials stepped one after another in the same process, per method, shape and K, and the peak memory per K.

    python benchmarks/fusion.py                                   # CPU: the tiny backbone, fp32 (the issue's CPU table)
    python benchmarks/fusion.py --backbone ViT-B-16 --precision fp16 --ks 1 8 16 --shapes 4x50   # a GPU
    python benchmarks/fusion.py ... --compile default --jsonl rows.jsonl --budget 80

A row: `fused_ms` (one fused step of K members), `sequential_ms` (K one-member steps), member-steps/s of each and
their ratio, the members' first-step losses fused against alone (the largest difference), peak memory (GPU:
measured; CPU: hisf-bench's own estimate, orchestrator/groups.py). `--jsonl` appends one line per row as it goes, so
a run stopped by its time limit keeps what it measured; `--budget` skips the rows that would not fit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import append_jsonl, timed  # noqa: E402
from hisf.config import BackboneConfig, MethodConfig, TrainConfig  # noqa: E402
from hisf.engine import Precision, compile_losses, release_compiled, train_step  # noqa: E402
from hisf.engine.checkpoint import TrialState  # noqa: E402
from hisf.engine.distributed import DistEnv  # noqa: E402
from hisf.engine.optim import member_optimizer  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def method_config(name: str, layers: int) -> MethodConfig:
    depth = min(12 if name == "hicropl" else 9, layers)
    extra = {"cross_layer": min(6, depth - 1), "n_ctx": 4 if layers < 12 else None} if name == "hicropl" else {}
    return MethodConfig(name=name, depth=depth, **{k: v for k, v in extra.items() if v is not None})


def build(method: MethodConfig, backbone, classes: int, seeds: list[int], device):
    """A model of one member per seed (member k starts from what seed k draws, in any group) and their states."""
    from hisf.model.methods import build_method

    names = [f"class {i}" for i in range(classes)]
    model = build_method(method, backbone, names, members=[method] * len(seeds), seeds=seeds)
    model.to(device).train()
    cfg = TrainConfig(preset="hicropl" if method.name == "hicropl" else "paper", lr=1e-3, warmup_epochs=0)
    states = []
    for k in range(len(seeds)):
        opt, sched, pairs = member_optimizer(model, k, cfg)
        states.append(TrialState(model, opt, sched, None, member=k, pairs=pairs))
    return model, states


def row(args, backbone, method_name: str, batch: int, classes: int, k: int, device, precision: Precision) -> dict:
    env = DistEnv(0, 1, 0, device, owns_group=False)
    method = method_config(method_name, min(backbone.text_layers, backbone.vision_layers))
    g = torch.Generator().manual_seed(7)
    images = torch.randn(k * batch, 3, backbone.image_size, backbone.image_size, generator=g).to(device)
    labels = torch.randint(0, classes, (k, batch), generator=g).to(device)
    scaler = (lambda: torch.amp.GradScaler(device.type, init_scale=1024.0)) if precision.grad_scaling else (lambda: None)

    fused, states = build(method, backbone, classes, list(range(k)), device)
    for s in states:
        s.scaler = scaler()
    if args.compile:
        torch._dynamo.reset()
        compile_losses(fused, args.compile)
    first_fused = [r.losses["loss"] for r in train_step(fused, images, labels, states, precision, env)]
    fused_run = timed(lambda: train_step(fused, images, labels, states, precision, env), args.warmup, args.steps, device)
    fused_ms, fused_first_s, fused_peak = fused_run["ms_per_step"], fused_run["first_step_s"], fused_run["peak_mib"]
    if args.compile:
        release_compiled(fused)
    del fused, states

    alone = []
    for i in range(k):
        m, (s,) = build(method, backbone, classes, [i], device)
        s.scaler = scaler()
        alone.append((m, s))
    first_alone = [train_step(m, images[i * batch:(i + 1) * batch], labels[i:i + 1], [s], precision, env)[0].losses["loss"]
                   for i, (m, s) in enumerate(alone)]

    def sequential():
        for i, (m, s) in enumerate(alone):
            train_step(m, images[i * batch:(i + 1) * batch], labels[i:i + 1], [s], precision, env)

    seq_ms = timed(sequential, max(1, args.warmup // 2), max(1, args.steps // 2), device)["ms_per_step"]
    del alone
    if device.type != "cuda":
        from orchestrator.groups import estimate_peak_bytes
        from hisf.config import DataConfig, TrialConfig

        cfg = TrialConfig(backbone=args.backbone_cfg, method=method, data=DataConfig(),
                          train=TrainConfig(batch_size=batch, precision=args.precision))
        fused_peak = estimate_peak_bytes(cfg, k, classes) / 2 ** 20
    return {"record": "row", "method": method_name, "batch": batch, "classes": classes, "k": k,
            "compile": args.compile or "eager", "precision": precision.name,
            "fused_ms": fused_ms, "sequential_ms": seq_ms,
            "fused_member_steps_per_s": k * 1000 / fused_ms, "sequential_member_steps_per_s": k * 1000 / seq_ms,
            "speedup": seq_ms / fused_ms, "first_step_s": fused_first_s,
            "loss_diff": max(abs(a - b) for a, b in zip(first_fused, first_alone)),
            "peak_mib": fused_peak, "peak_kind": "measured" if device.type == "cuda" else "estimate"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="hisf-tiny")
    p.add_argument("--methods", nargs="+", default=["maple", "hisf", "hicropl"])
    p.add_argument("--shapes", nargs="+", default=["4x50", "32x500"], help="BATCHxCLASSES")
    p.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--storage", choices=sorted(DTYPES), default="fp32", help="the backbone's storage dtype")
    p.add_argument("--compile", default=None, help="torch.compile mode of the fused and the lone steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--jsonl", default=None)
    p.add_argument("--budget", type=float, default=None, help="seconds: skip rows that would not fit")
    args = p.parse_args(argv)
    from hisf.model.backbone import load_backbone

    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    args.backbone_cfg = BackboneConfig(name=args.backbone, pretrained=None, precision=args.storage)
    backbone = load_backbone(args.backbone_cfg)
    backbone.model.to(device)
    name = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}[args.precision]
    precision = Precision(name, device.type, DTYPES[args.precision], grad_scaling=args.precision == "fp16")
    started, spent = time.perf_counter(), {}
    append_jsonl(args.jsonl, {"record": "run", "backbone": args.backbone, "device": str(device), "torch": torch.__version__,
                        "compile": args.compile or "eager", "precision": name, "threads": torch.get_num_threads()})
    print(f"{'method':8s} {'shape':>7s} {'K':>3s} {'fused ms':>9s} {'seq ms':>9s} {'fused m-steps/s':>15s} "
          f"{'seq m-steps/s':>13s} {'speedup':>7s} {'peak MiB':>9s} {'loss diff':>9s}", flush=True)
    for shape in args.shapes:
        batch, classes = (int(v) for v in shape.split("x"))
        for method in args.methods:
            for k in args.ks:
                guess = spent.get((method, shape), 0.0) * k
                if args.budget and time.perf_counter() - started + guess > args.budget:
                    append_jsonl(args.jsonl, {"record": "skipped", "method": method, "shape": shape, "k": k})
                    continue
                t0 = time.perf_counter()
                r = row(args, backbone, method, batch, classes, k, device, precision)
                spent[(method, shape)] = (time.perf_counter() - t0) / k
                append_jsonl(args.jsonl, r)
                print(f"{method:8s} {shape:>7s} {k:3d} {r['fused_ms']:9.1f} {r['sequential_ms']:9.1f} "
                      f"{r['fused_member_steps_per_s']:15.1f} {r['sequential_member_steps_per_s']:13.1f} "
                      f"{r['speedup']:7.2f} {r['peak_mib']:9.0f} {r['loss_diff']:9.2e}", flush=True)
    append_jsonl(args.jsonl, {"record": "end", "seconds": time.perf_counter() - started})
    return 0



if __name__ == "__main__":
    sys.exit(main())
