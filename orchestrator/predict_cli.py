"""`hisf-bench predict` (top-k classes of image files) and `hisf-bench eval` (accuracy, per-class accuracy and the
confusion matrix on a built dataset, logged to MLflow) from a finished trial: orchestrator/predict.py on the command
line. Bad input is one `error: ...` line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys

from orchestrator.context import DEFAULT_WORKDIR

SOURCE_HELP = ("a finished trial: its MLflow run id (in --tracking-uri) or its folder holding prompts.pt and "
               "config.yaml (hisf-bench/runs/<spec>/<trial id>, or `hisf-bench train`'s output_dir)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="RUN_OR_DIR", help=SOURCE_HELP)
    p.add_argument("--workdir", default=DEFAULT_WORKDIR,
                   help="the run commands' --workdir, where the default store is (default: ./hisf-bench)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///<workdir>/mlflow.db)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="where built datasets live, ROOT/<key> (default: the trial's own data.root)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward (default: the trial's eval batch size)")


def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hisf-bench predict", description=(
        "Top-k classes of each image file by a finished trial's prompts, over its training classes (default), the "
        "names given with --classes, or the classes of a built dataset (--dataset; with --classes: a subset of them)."))
    _common(p)
    p.add_argument("images", metavar="IMAGES", nargs="+", help="image files (any format PIL reads)")
    p.add_argument("--classes", nargs="+", default=None, metavar="NAME", help="class names to choose among")
    p.add_argument("--dataset", default=None, metavar="KEY", help="a built dataset under --data-root: its classes")
    p.add_argument("--top-k", type=int, default=5, help="classes listed per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hisf-bench eval", description=(
        "Accuracy, per-class accuracy and the confusion matrix of a finished trial on a built dataset, logged to a new "
        "MLflow run in the source run's experiment (tagged hisf.source_run) with eval/<split>.json and .png."))
    _common(p)
    p.add_argument("--dataset", default=None, metavar="KEY", help="a built dataset under --data-root (default: the "
                                                                   "trial's own)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="the split scored (default test)")
    p.add_argument("--classes", default="all", choices=("all", "base", "novel"),
                   help="its classes: all, or the base / novel half of base-to-novel (default all)")
    p.add_argument("--out", default=None, metavar="DIR", help="also keep eval/<split>.json and .png under DIR")
    p.add_argument("--ui-url", default=None, help="MLflow UI address for the printed link (default http://127.0.0.1:5000)")
    p.add_argument("--json", action="store_true", help="print the per-class record as JSON instead of the summary")
    return p


def _quiet_mlflow() -> None:
    import logging
    import os

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per downloaded file otherwise
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def predict_main(argv: list[str]) -> int:
    args = predict_parser().parse_args(argv)
    _quiet_mlflow()
    from orchestrator.predict import load_trial, predict

    try:
        trial = load_trial(args.source, args.tracking_uri, args.device, args.workdir)
        preds = predict(trial, args.images, classes=args.classes, dataset=args.dataset, data_root=args.data_root,
                        top_k=args.top_k, batch_size=args.batch_size or trial.config.train.eval_batch_size)
    except ValueError as e:  # ConfigError, DataError, PredictError: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = trial.classes
    if args.json:
        print(json.dumps({"source": args.source, "run_id": trial.run_id, "method": trial.config.method.name,
                          "trained_on": trial.config.data.dataset, "classes": list(names),
                          "predictions": [p.to_dict() for p in preds]}, indent=2))
        return 0
    what = ("its training classes" if args.classes is None and args.dataset is None else
            f"dataset {args.dataset}" if args.classes is None else "the classes given")
    print(f"{trial.describe()}: top {min(args.top_k, len(names))} of {len(names)} classes ({what})")
    width = max(len(c) for p in preds for c, _, _ in p.top)
    for p in preds:
        print(p.image)
        for i, (c, prob, _) in enumerate(p.top, start=1):
            print(f"  {i}. {c:<{width}}  {100 * prob:6.2f}%")
    return 0


def eval_main(argv: list[str]) -> int:
    args = eval_parser().parse_args(argv)
    _quiet_mlflow()
    from orchestrator.predict import evaluate, load_trial

    try:
        trial = load_trial(args.source, args.tracking_uri, args.device, args.workdir)
        res = evaluate(trial, args.dataset, args.data_root, args.split, args.classes, tracking_uri=args.tracking_uri,
                       out_dir=args.out, batch_size=args.batch_size, ui_url=args.ui_url, workdir=args.workdir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rec = res.record
    if args.json:
        print(json.dumps({**rec, "run_id": res.run_id, "link": res.link}))
        return 0
    from hisf.class_results import worst_classes

    mean = rec["mean_class_accuracy"]
    print(f"{trial.describe()} on {res.dataset} {res.split} ({res.classes} classes: {len(rec['classnames'])}, "
          f"{rec['total']} images): top-1 {rec['accuracy']:.2f}%, mean per-class "
          f"{'n/a' if mean is None else f'{mean:.2f}%'}")
    worst = worst_classes(rec, 5)
    print("  worst classes: " + " · ".join(f"{rec['classnames'][i]} {rec['per_class_accuracy'][i]:.1f}%" for i in worst))
    print(f"  MLflow run {res.run_id}: {res.link}")
    split = rec["split"]
    print(f"  artifacts: eval/{split}.json, eval/{split}.png" + (f" (also under {args.out}/eval)" if args.out else ""))
    return 0
