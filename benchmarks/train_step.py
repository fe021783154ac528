"""Times the training step (images/s, ms/step, peak memory) of our `maple`/`hisf` against MaPLe's eager fp16 formulation.

Usage (GPU, ViT-B/16 size with random weights):
    python benchmarks/train_step.py                      # batch 4 and 32 x 50/500/1000 classes
    python benchmarks/train_step.py --compile            # torch.compile the loss computation (train.compile)
    python benchmarks/train_step.py --compile reduce-overhead   # ... and CUDA graphs
    python benchmarks/train_step.py --shapes 4x50 32x500 --methods maple hisf --json rows.json
CPU smoke run (tiny model, what CI exercises):
    python benchmarks/train_step.py --tiny [--precision fp16 --reference-precision fp16]

`--methods` defaults to every registered prompt method but the baselines that have no multi-modal prompts
(zeroshot, coop). Rows run in priority order: MaPLe's reference and our maple at the target shapes
(`--targets`, default the shapes of benchmarks/gpu_summary.py's targets that are in `--shapes`), then the
other methods there, then every other shape. `--budget S` stops before a row that, judged by the rows of
its kind so far, would end after S seconds of this process (target rows always run). `--json` rewrites its
file after every row; `--jsonl` appends one record per line as it goes (scripts/gpu_check.sh: a killed run
leaves every finished row and no temporary file), `--reference-from` takes MaPLe's reference timings from
such a file instead of measuring them again.

Ours runs the engine's own `train_step` (`--precision`: fp16 = backbone stored in half, autocast + GradScaler,
also on a CPU; the text encoder truncated to the positions the prompts need). The reference is
`benchmarks/maple_reference.py`, MaPLe's CustomCLIP run eagerly in MaPLe's `PREC: fp16` storage
(`--reference-precision`; `to_maple_fp16`: OpenAI's convert_weights, LayerNorms float32), fed the same
weights and prompts. Before timing, the fp32 first-step losses of our `maple`, our full-length path and the
reference are printed per class count so a speed-up never hides a different computation.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the budget counts this process's imports too

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

# open_clip imports `transformers` for CoCa's text generation when it is installed (2-4 s per process on
# the GPU image); this benchmark builds plain CLIP towers only.
sys.modules.setdefault("transformers", None)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_summary import TARGETS  # noqa: E402
from benchmarks.maple_reference import ReferenceMaPLe, to_maple_fp16  # noqa: E402
from benchmarks.timing import append_jsonl, timed  # noqa: E402
from hisf.config import BackboneConfig, MethodConfig, TrainConfig  # noqa: E402
from hisf.engine import Precision, compile_losses, release_compiled, seed_everything, train_step  # noqa: E402
from hisf.engine.distributed import DistEnv  # noqa: E402
from hisf.engine.optim import member_optimizer  # noqa: E402
from hisf.model.backbone import load_backbone  # noqa: E402
from hisf.model.facts import METHODS  # noqa: E402
from hisf.model.maple_import import maple_key_map  # noqa: E402
from hisf.model.methods import build_method  # noqa: E402

# Baselines without multi-modal prompts: not what the comparison with MaPLe's formulation is about.
NOT_BENCHMARKED = ("zeroshot", "coop")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


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


class CachedTokenizer:
    """The backbone's tokenizer with one row per distinct text kept: HiCroPL's text teacher tokenises 80
    templates per class (80,000 sentences for 1000 classes, seconds of host time), and every shape with the
    same classes, the reference and the fp32 loss check tokenise the same prompts again."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.rows: dict[str, torch.Tensor] = {}

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if context_length is not None or not texts:
            return self.tokenizer(texts, context_length) if context_length else self.tokenizer(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self.rows]
        if missing:
            self.rows.update(zip(missing, self.tokenizer(missing)))
        return torch.stack([self.rows[t] for t in texts])

    def __getattr__(self, name: str):
        if name in ("tokenizer", "rows"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


def bench_backbone(name: str, precision: str, device: torch.device, tokenizer: CachedTokenizer | None):
    """The frozen backbone (seeded random weights, the same for every storage precision) on `device`."""
    seed_everything(0)
    backbone = load_backbone(BackboneConfig(name=name, pretrained=None, precision=precision))
    backbone.model.to(device)
    backbone.tokenizer = tokenizer or CachedTokenizer(backbone.tokenizer)
    return backbone


def build_ours(method: str, backbone, n_classes: int, device: torch.device, compile_: str | None, truncate: bool = True):
    """Our `method` over `n_classes` on `device` (seeded prompts) with the paper's SGD; optionally compiled."""
    # The method's default depth (MaPLe/HISF 9, HiCroPL 12 with k = 6), capped by the model's layers (hisf-tiny has 3).
    n_layers = min(backbone.text_layers, backbone.vision_layers)
    depth = min(MethodConfig(name=method).depth, n_layers)
    extra = {"cross_layer": min(6, depth - 1)} if method == "hicropl" else {}
    seed_everything(0)
    model = build_method(MethodConfig(name=method, depth=depth, **extra), backbone, classnames(n_classes))
    model.to(device).train()
    model.truncate_text = truncate
    if compile_:
        torch._dynamo.reset()  # each row compiles afresh: no recompile limit across rows, no stale CUDA graphs
        compile_losses(model, compile_)  # what train.compile does in a trial
    return model


def paper_states(model, precision: Precision) -> list:
    """Each member's TrialState under the `paper` preset (lr 1e-3, no warm-up epoch), with its own GradScaler in fp16."""
    from hisf.engine.checkpoint import TrialState

    cfg = TrainConfig(preset="paper", lr=1e-3, warmup_epochs=0)
    states = []
    for k in range(getattr(model, "members", 1)):
        opt, sched, pairs = member_optimizer(model, k, cfg)
        states.append(TrialState(model, opt, sched, precision.new_scaler(), member=k, pairs=pairs))
    return states


def build_reference(ours_maple, backbone, n_classes: int, device: torch.device, precision: str) -> ReferenceMaPLe:
    """MaPLe's formulation on our backbone's weights and our maple's prompts, in MaPLe's fp16 or in fp32 storage."""
    sd = ours_maple.trainable_state_dict()
    depth = len(ours_maple.layers)
    maple_sd = {theirs: sd[mine].to(device) for theirs, mine in maple_key_map(depth).items()}
    clip_sd = backbone.model.state_dict()  # on the device: no host copy of the weights
    blocks = backbone.model.transformer.resblocks, backbone.model.visual.transformer.resblocks
    ref = ReferenceMaPLe(clip_sd, maple_sd, classnames(n_classes), backbone.tokenizer,
                         text_heads=blocks[0][0].attn.num_heads, vision_heads=blocks[1][0].attn.num_heads,
                         device=device)
    trainable = {"ctx", "proj.weight", "proj.bias"}
    for name, p in ref.named_parameters():
        p.requires_grad_(name in trainable or name.startswith(("compound_prompts_text", "compound_prompt_projections")))
    return to_maple_fp16(ref) if precision == "fp16" else ref


def reference_optimizer(ref):
    # MaPLe's optimiser over its prompt learner (fp16 ctx/proj, fp32 compound prompts under PREC fp16).
    return torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=1e-3, momentum=0.9, weight_decay=5e-4)


def reference_step(ref, opt, images, labels) -> float:
    # MaPLe's fp16 step: no autocast, no loss scaling, the loss read every step.
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(ref(images), labels)
    loss.backward()
    opt.step()
    return float(loss.item())


def step_precision(name: str, device: torch.device) -> Precision:
    """Our step's precision, the GPU's on any device (fp16: autocast + GradScaler also on a CPU)."""
    return Precision(name, device.type, _DTYPES[name], grad_scaling=name == "fp16")


class Output:
    """The report (`--json`, rewritten after every record) and its records (`--jsonl`, one appended line each)."""

    def __init__(self, json_path: str | None, jsonl_path: str | None, report: dict):
        self.json_path, self.jsonl_path, self.report = json_path, jsonl_path, report
        self.record({"record": "run", **{k: v for k, v in report.items() if k not in ("rows", "loss_checks")}})

    def record(self, rec: dict) -> None:
        rec = {**rec, "run": self.report["mode"]}
        if rec["record"] == "row":
            self.report["rows"].append(rec)
        elif rec["record"] == "loss_check":
            self.report["loss_checks"].append(rec)
            self.report["loss_check"] = self.report["loss_checks"][0]  # the first shape's, under its historical key
        elif rec["record"] in ("skipped", "end"):
            self.report.update({k: v for k, v in rec.items() if k not in ("record", "run")})
        append_jsonl(self.jsonl_path, rec)
        if self.json_path:
            tmp = Path(self.json_path).with_suffix(".tmp")
            tmp.write_text(json.dumps(self.report, indent=2))
            tmp.replace(self.json_path)


def reused_references(path: str | None, precision: str) -> dict[tuple[int, int], dict]:
    """(batch, classes) -> a reference row of that precision in a `--jsonl` file (torn lines skipped)."""
    found: dict[tuple[int, int], dict] = {}
    if not path or not Path(path).is_file():
        return found
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("record") == "row" and rec.get("kind") == "reference" and rec.get("precision") == precision:
            found[(rec["batch"], rec["classes"])] = rec
    return found


@dataclass(frozen=True)
class Planned:
    kind: str  # reference | ours
    method: str
    batch: int
    classes: int
    target: bool  # never skipped for the budget

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.method


def plan_rows(shapes, methods, targets, reference: bool) -> list[Planned]:
    """The rows in priority order: reference + maple at the targets, other methods there, then the rest."""
    first = [m for m in methods if m == "maple"]
    rest = [m for m in methods if m != "maple"]
    rows: list[Planned] = []
    at_targets = [s for s in shapes if s in targets]
    for b, c in at_targets:
        rows += [Planned("reference", "maple", b, c, True)] if reference else []
        rows += [Planned("ours", m, b, c, True) for m in first]
    for b, c in at_targets:
        rows += [Planned("ours", m, b, c, False) for m in rest]
    for b, c in shapes:
        if (b, c) not in targets:
            rows += [Planned("reference", "maple", b, c, False)] if reference else []
            rows += [Planned("ours", m, b, c, False) for m in methods]
    return rows


def loss_check(backbone32, ref32: ReferenceMaPLe, n_classes: int, batch: int, device: torch.device) -> dict[str, float]:
    """First-step losses on one batch: our maple (fast text path), our full-length path, MaPLe's reference (fp32)."""
    model = build_ours("maple", backbone32, n_classes, device, compile_=None, truncate=True)
    g = torch.Generator().manual_seed(batch * 100_003 + n_classes)
    size = backbone32.image_size
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, n_classes, (batch,), generator=g).to(device)
    ref32.set_classnames(classnames(n_classes), backbone32.tokenizer)
    with torch.no_grad():
        fast = model.forward_losses(images, labels)["loss"].item()
        model.truncate_text = False
        eager = model.forward_losses(images, labels)["loss"].item()
        reference = F.cross_entropy(ref32(images), labels).item()
    return {"ours_fast": fast, "ours_eager_77": eager, "maple_reference": reference}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="hisf-tiny model on CPU (smoke run; numbers mean nothing)")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--methods", nargs="+", default=None, choices=sorted(METHODS),
                   help=f"our methods to time (default: {' '.join(prompt_methods())})")
    p.add_argument("--batches", nargs="+", type=int, default=None)
    p.add_argument("--classes", nargs="+", type=int, default=None)
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=None, metavar="BxC",
                   help="explicit (batch x classes) pairs instead of --batches x --classes, e.g. 4x50 32x500")
    p.add_argument("--targets", nargs="*", type=parse_shape, default=None, metavar="BxC",
                   help="shapes timed first and never skipped for the budget (default: the summary's targets)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile our loss computation (train.compile), optionally with a mode")
    p.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default=None,
                   help="our step's precision and backbone storage (default fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--reference-precision", choices=["fp16", "fp32"], default=None,
                   help="MaPLe's PREC for its formulation (default fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--no-reference", action="store_true", help="skip MaPLe's reference formulation")
    p.add_argument("--reference-from", default=None, metavar="JSONL",
                   help="take the reference rows of matching shapes from this --jsonl file instead of timing them")
    p.add_argument("--no-loss-check", action="store_true", help="skip the fp32 first-step loss comparison")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="stop before a non-target row that would end past this many seconds of this process")
    p.add_argument("--json", help="write the report to this file (rewritten after every row)")
    p.add_argument("--jsonl", help="append one JSON record per line to this file as rows finish")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    cuda = device.type == "cuda"
    if cuda and device.index is not None:
        torch.cuda.set_device(device)  # `--device cuda:1`: kernels, allocations and cuBLAS handles on that GPU
    methods = args.methods or prompt_methods()
    if args.shapes:
        shapes = list(dict.fromkeys(args.shapes))
    else:
        batches = args.batches or ([4] if args.tiny else [4, 32])
        n_classes = args.classes or ([50] if args.tiny else [50, 500, 1000])
        shapes = [(b, c) for b in batches for c in n_classes]
    targets = set(args.targets if args.targets is not None else TARGETS) & set(shapes)
    # The listed order, targets first (a run stopped by its time limit keeps the rows that matter most).
    shapes = sorted(shapes, key=lambda s: s not in targets)
    steps = args.steps or (3 if args.tiny else 50)
    warmup = max(1, args.warmup or (1 if args.tiny else 10))
    name = "hisf-tiny" if args.tiny else "ViT-B-16"
    mode = args.compile or "eager"
    prec_name = args.precision or ("fp16" if cuda else "fp32")
    ref_prec = args.reference_precision or ("fp16" if cuda else "fp32")
    if not cuda:
        print("note: no CUDA device; CPU numbers are a smoke test, not the benchmark", file=sys.stderr)
    out = Output(args.json, args.jsonl, {
        "bench": "train_step", "device": str(torch.cuda.get_device_name(device) if cuda else "cpu"),
        "torch": torch.__version__, "model": name, "mode": mode, "precision": prec_name,
        "reference_precision": ref_prec, "steps": steps, "warmup": warmup, "methods": methods,
        "shapes": [f"{b}x{c}" for b, c in shapes], "budget_s": args.budget, "loss_checks": [], "rows": [],
        "complete": False})
    tokenizer = None
    if not args.no_loss_check:
        # fp32, one batch per class count: our fast text path, our full-length path and MaPLe's reference.
        backbone32 = bench_backbone(name, "fp32", device, None)
        tokenizer = backbone32.tokenizer
        batch0 = shapes[0][0]
        ref32 = None
        for c in dict.fromkeys(c for _, c in shapes):
            if ref32 is None:
                ref32 = build_reference(build_ours("maple", backbone32, c, device, None), backbone32, c, device, "fp32")
            check = {"batch": batch0, "classes": c, **loss_check(backbone32, ref32, c, batch0, device)}
            out.record({"record": "loss_check", **check})
            print(f"first-step loss, maple, batch {batch0}, {c} classes: "
                  + ", ".join(f"{k} {v:.6f}" for k, v in check.items() if k not in ("batch", "classes")), flush=True)
        del backbone32, ref32
        if cuda:
            torch.cuda.empty_cache()

    backbone = bench_backbone(name, prec_name, device, tokenizer)  # stored as our step's precision
    env = DistEnv(0, 1, 0, device, owns_group=False)
    reused = reused_references(args.reference_from, ref_prec)
    references: dict[str, object] = {}  # one ReferenceMaPLe per run, its class set switched per row
    models: dict[tuple[str, int], tuple] = {}  # eager models per (method, classes), reset per row
    batches: dict[tuple[int, int], tuple] = {}
    ref_ms: dict[tuple[int, int], float] = {}
    spent: dict[tuple[str, str], float] = {}  # the longest row of each kind so far, for the budget

    def batch_of(b: int, c: int):
        if (b, c) not in batches:
            g = torch.Generator().manual_seed(b * 100_003 + c)
            size = backbone.image_size
            batches[(b, c)] = (torch.randn(b, 3, size, size, generator=g).to(device),
                               torch.randint(0, c, (b,), generator=g).to(device))
        return batches[(b, c)]

    def reference_row(row: Planned) -> dict:
        if "ref" not in references:
            maple = build_ours("maple", backbone, row.classes, device, None)
            ref = build_reference(maple, backbone, row.classes, device, ref_prec)
            initial = [p.detach().clone() for p in ref.parameters() if p.requires_grad]
            references["ref"] = (ref, initial)
            del maple
        ref, initial = references["ref"]
        with torch.no_grad():
            for p, v in zip([p for p in ref.parameters() if p.requires_grad], initial):
                p.copy_(v)
        ref.set_classnames(classnames(row.classes), backbone.tokenizer)
        opt = reference_optimizer(ref)
        images, labels = batch_of(row.batch, row.classes)
        return {"formulation": f"maple_reference_{ref_prec}", "precision": ref_prec, "mode": "eager",
                **timed(lambda: reference_step(ref, opt, images, labels), warmup, steps, device)}

    def ours_row(row: Planned) -> dict:
        if args.compile:
            model = build_ours(row.method, backbone, row.classes, device, args.compile)
        else:
            if (row.method, row.classes) not in models:
                model = build_ours(row.method, backbone, row.classes, device, None)
                models[(row.method, row.classes)] = (model, model.trainable_state_dict())
            model, initial = models[(row.method, row.classes)]
            model.load_trainable_state_dict(initial)
        prec = step_precision(prec_name, device)
        states = paper_states(model, prec)
        images, labels = batch_of(row.batch, row.classes)
        try:
            result = timed(lambda: train_step(model, images, labels, states, prec, env)[0].losses["loss"],
                           warmup, steps, device)
        finally:
            if args.compile:
                release_compiled(model)
        suffix = "" if mode == "eager" else f"_{mode}"
        return {"formulation": f"ours_{row.method}_{prec_name}{suffix}", "precision": prec_name, "mode": mode, **result}

    print(f"mode {mode}, {steps} steps after {warmup} warm-up, {out.report['device']}", flush=True)
    print(f"{'formulation':<34}{'batch':>6}{'classes':>8}{'ms/step':>10}{'img/s':>10}{'peak MiB':>10}{'x ref':>8}"
          f"{'loss':>10}{'1st s':>8}", flush=True)
    rows = plan_rows(shapes, methods, targets, reference=not args.no_reference)
    for i, row in enumerate(rows):
        shape = (row.batch, row.classes)
        if row.kind == "reference" and shape in reused:
            ref_ms[shape] = reused[shape]["ms_per_step"]
            print(f"{'(reference from ' + Path(args.reference_from).name + ')':<34}{row.batch:>6}{row.classes:>8}"
                  f"{ref_ms[shape]:>10.2f}", flush=True)
            continue
        elapsed = time.monotonic() - STARTED
        estimate = spent.get(row.key)
        if args.budget is not None and not row.target and estimate is not None and elapsed + estimate > args.budget:
            left = [f"{r.kind}:{r.method}:{r.batch}x{r.classes}" for r in rows[i:]]
            out.record({"record": "skipped", "skipped": left, "skip_reason":
                        f"budget: {elapsed:.0f}s of {args.budget:.0f}s spent, the next row takes ~{estimate:.0f}s"})
            print(f"budget: stopping before {len(left)} row(s) ({elapsed:.0f}s of {args.budget:.0f}s spent, "
                  f"~{estimate:.0f}s per {row.kind} {row.method} row)", flush=True)
            break
        if cuda:
            torch.cuda.empty_cache()
        t0 = time.monotonic()
        result = reference_row(row) if row.kind == "reference" else ours_row(row)
        spent[row.key] = max(spent.get(row.key, 0.0), time.monotonic() - t0)
        rec = {"record": "row", "kind": row.kind, "method": row.method, "batch": row.batch, "classes": row.classes,
               "target": row.target, **result, "row_s": time.monotonic() - t0}
        rec["images_per_s"] = rec["batch"] * 1000 / rec["ms_per_step"]
        if row.kind == "reference":
            ref_ms[shape] = rec["ms_per_step"]
        else:
            rec["speedup_vs_reference"] = ref_ms[shape] / rec["ms_per_step"] if shape in ref_ms else None
            if shape in reused:
                rec["reference_from"] = reused[shape].get("run", "eager")
        out.record(rec)
        speedup = rec.get("speedup_vs_reference", 1.0)
        print(f"{rec['formulation']:<34}{rec['batch']:>6}{rec['classes']:>8}{rec['ms_per_step']:>10.2f}"
              f"{rec['images_per_s']:>10.1f}{rec['peak_mib']:>10.0f}{'-' if speedup is None else f'{speedup:.2f}':>8}"
              f"{rec['first_loss']:>10.4f}{rec['first_step_s']:>8.1f}", flush=True)
    else:
        out.report["complete"] = True
    out.record({"record": "end", "complete": out.report["complete"], "seconds": time.monotonic() - STARTED})
    return 0


if __name__ == "__main__":
    sys.exit(main())
