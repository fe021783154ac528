"""Using a finished trial's prompts: load it (an MLflow run id or its trial folder), top-k classes of image files,
and accuracy, per-class accuracy and the confusion matrix on a built dataset, logged to a new MLflow run linked to
the source run (`hisf-bench predict`, `hisf-bench eval`; also from a notebook:
`from orchestrator.predict import load_trial, predict, evaluate`).

The model is rebuilt from the trial's own config (method, backbone) and exported prompts (`prompts.pt`, read with
`weights_only`), and images go through the evaluation transform of `data_shards` at the backbone's image size and
normalisation, as in the trial's own evaluation."""

from __future__ import annotations

import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hisf.config import ConfigError

PROMPTS = "prompts.pt"
CONFIG = "config.yaml"
RUN_ID = re.compile(r"[0-9a-f]{32}")


class PredictError(ConfigError):
    """A source, image, class or dataset we cannot use; the message names it and what was expected."""


@dataclass
class LoadedTrial:
    """A finished trial ready to score images: its config, its model over its prompts, and where it came from."""

    config: Any  # hisf.config.TrialConfig
    model: Any  # hisf.model.prompt_model.PromptModel (one member)
    classnames: tuple[str, ...]  # its training classes, as prompts.pt stores them
    template: str  # its dataset's prompt template
    source: str  # what was given: a run id or a folder
    device: Any
    run: Any = None  # mlflow.entities.Run of the source, when known
    tracking_uri: str | None = None
    folder: Path | None = None  # the trial folder, for a folder source
    precision: Any = None  # hisf.engine.Precision of the trial's evaluation on this device
    tags: dict[str, str] = field(default_factory=dict)
    classes: tuple[str, ...] = ()  # the class set the model scores over now (use_classes), as given

    def __post_init__(self) -> None:
        self.classes = self.classes or self.classnames

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run is not None else None

    def describe(self) -> str:
        cfg = self.config
        what = self.tags.get("mlflow.runName") or f"{cfg.method.name} · {cfg.data.dataset} · seed {cfg.seed}"
        where = f"run {self.run_id}" if self.run is not None else str(self.folder)
        return f"{what} ({where})"

    def use_classes(self, names: Sequence[str], template: str | None = None, dataset: str | None = None) -> None:
        """Score over `names` from now on (HISF keeps the trained label embeddings of its training classes)."""
        from hisf.model.prompts import PromptError

        try:
            self.model.set_classnames(list(names), template=template or self.template,
                                      dataset=dataset or self.config.data.dataset)
        except PromptError as e:
            raise PredictError(f"--classes: {e}") from None
        self.classes = tuple(names)


def load_trial(source: str | Path, tracking_uri: str | None = None, device: str | None = None,
               workdir: str | Path = "hisf-bench") -> LoadedTrial:
    """A finished trial from an MLflow run id (in `tracking_uri`, default the workdir's store) or a trial folder
    holding prompts.pt and config.yaml; its model on `device` (default: cuda when available, else cpu)."""
    from orchestrator.context import default_tracking_uri

    text = str(source)
    path = Path(text)
    if path.is_file() and path.name == PROMPTS:
        path = path.parent
    if path.is_dir():
        missing = [f for f in (PROMPTS, CONFIG) if not (path / f).is_file()]
        if missing:
            raise PredictError(f"{path}: no {' and no '.join(missing)} in this folder: a finished trial's folder holds "
                               f"{PROMPTS} and {CONFIG} (hisf-bench/runs/<spec>/<trial id>/, or train's output_dir)")
        return _build(path / PROMPTS, path / CONFIG, text, device, folder=path.resolve(),
                      tracking_uri=tracking_uri or default_tracking_uri(workdir))
    if path.exists():
        raise PredictError(f"{text}: a file; expected a trial folder (holding {PROMPTS} and {CONFIG}) or an MLflow "
                           "run id")
    if not RUN_ID.fullmatch(text):
        raise PredictError(f"{text}: neither a trial folder (holding {PROMPTS} and {CONFIG}) nor an MLflow run id "
                           "(32 hexadecimal digits)")
    uri = tracking_uri or default_tracking_uri(workdir)
    run = find_run(text, uri)
    with tempfile.TemporaryDirectory(prefix="hisf-predict-") as tmp:
        files = {name: _download(run, name, uri, Path(tmp)) for name in (PROMPTS, CONFIG)}
        return _build(files[PROMPTS], files[CONFIG], text, device, run=run, tracking_uri=uri)


def find_run(run_id: str, tracking_uri: str):
    """The MLflow run `run_id` in the store, or PredictError saying the store or the run is not there."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from orchestrator.report.plan import ReportError
    from orchestrator.report.runs import check_tracking_uri

    try:
        check_tracking_uri(tracking_uri)
    except ReportError as e:
        raise PredictError(str(e)) from None
    try:
        return MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code) or "not found" in str(e).lower():
            raise PredictError(f"run {run_id}: no such MLflow run in {tracking_uri} (pass --tracking-uri for "
                               "another store)") from None
        raise PredictError(f"run {run_id}: cannot read it from {tracking_uri}: {e}") from None


def _download(run, name: str, uri: str, dest: Path) -> Path:
    from mlflow.tracking import MlflowClient

    try:
        return Path(MlflowClient(uri).download_artifacts(run.info.run_id, name, str(dest)))
    except Exception:  # noqa: BLE001 - MLflow raises its own, OSError or an HTTP error for a missing artifact
        status = run.data.tags.get("hisf.status") or run.info.status.lower()
        raise PredictError(f"run {run.info.run_id} ({status}): has no {name} artifact; only a finished trial's run "
                           f"holds {PROMPTS} and {CONFIG}") from None


def _build(prompts: Path, config: Path, source: str, device: str | None, run: Any = None, folder: Path | None = None,
           tracking_uri: str | None = None) -> LoadedTrial:
    import torch

    from hisf.config import TrialConfig
    from hisf.engine.export import read_prompts
    from hisf.engine.step import resolve_precision
    from hisf.model.backbone import load_backbone
    from hisf.model.methods import build_method
    from hisf.model.prompt_model import DEFAULT_TEMPLATE

    cfg = TrialConfig.from_yaml(config)
    payload = read_prompts(prompts, cfg)
    classnames = tuple(payload.get("classnames") or ())
    if not classnames:
        raise PredictError(f"{prompts}: holds no training class names")
    template = payload.get("template") or _dataset_template(cfg) or DEFAULT_TEMPLATE
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone = load_backbone(cfg.backbone)
    model = build_method(cfg.method, backbone, classnames, template=template, dataset=cfg.data.dataset,
                         seeds=[cfg.seed]).to(dev)
    model.load_trainable_state_dict(payload["trainable"])
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 on a CPU runs bf16, as the trial did there
        precision = resolve_precision(cfg.train.precision, dev)
    tags = dict(run.data.tags) if run is not None else {}
    return LoadedTrial(cfg, model, classnames, template, source, dev, run, tracking_uri, folder, precision, tags)


def _dataset_template(cfg) -> str | None:
    """prompts.pt files written before they held the template: the trial's dataset's, when it is still built."""
    try:
        from data_shards import open_dataset

        return open_dataset(Path(cfg.data.root) / cfg.data.dataset).template
    except Exception:  # noqa: BLE001 - not built here: the default template
        return None


def open_built(trial: LoadedTrial, dataset: str | None, data_root: str | Path | None, needs: tuple[str, ...] = ()):
    """A built dataset by key under `data_root` (default: the trial's own data.root); errors say how to build it."""
    from hisf.engine.trial_data import open_built as open_key

    key = dataset or trial.config.data.dataset
    root = str(data_root if data_root is not None else trial.config.data.root)
    return open_key(root, key, "--dataset", needs)


def class_set(trial: LoadedTrial, classes: Sequence[str] | None = None, dataset: str | None = None,
              data_root: str | Path | None = None) -> tuple[tuple[str, ...], str, str | None]:
    """(class names, template, dataset key) to score over: the trial's training classes; `classes` (free names, or
    with `dataset` a subset of its classes, each checked); or a built dataset's classes and template."""
    if dataset is None:
        if classes is None:
            return trial.classnames, trial.template, None
        return tuple(classes), trial.template, None
    ds = open_built(trial, dataset, data_root)
    if classes is None:
        return tuple(ds.classnames), ds.template, ds.key
    known = {n: n for n in ds.classnames} | {n.replace("_", " "): n for n in ds.classnames}
    unknown = [c for c in classes if c not in known]
    if unknown:
        shown = ", ".join(repr(n) for n in ds.classnames[:8]) + (", ..." if len(ds.classnames) > 8 else "")
        raise PredictError(f"--classes: {', '.join(repr(c) for c in unknown)} not among the {len(ds.classnames)} "
                           f"classes of dataset {ds.key!r} at {ds.path} ({shown})")
    return tuple(known[c] for c in classes), ds.template, ds.key


@dataclass(frozen=True)
class Prediction:
    image: str
    top: tuple[tuple[str, float, float], ...]  # (class name, probability, logit), best first

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "top_k": [{"rank": i + 1, "class": c, "probability": p, "logit": lg}
                                                for i, (c, p, lg) in enumerate(self.top)]}


def read_images(paths: Sequence[str | Path], image_size: int, mean, std):
    """The image files as one evaluation batch (data_shards' evaluation transform); PredictError naming a bad file."""
    from PIL import Image, UnidentifiedImageError

    from data_shards import eval_images

    datas = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise PredictError(f"{p}: image file not found")
        data = p.read_bytes()
        try:
            with Image.open(p) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise PredictError(f"{p}: not an image file PIL can read ({type(e).__name__})") from None
        datas.append(data)
    return eval_images(datas, image_size, mean, std)


def predict(trial: LoadedTrial, images: Sequence[str | Path], classes: Sequence[str] | None = None,
            dataset: str | None = None, data_root: str | Path | None = None, top_k: int = 5,
            batch_size: int = 64) -> list[Prediction]:
    """The top-k classes of each image file (softmax over the class set: the trial's training classes by default,
    or `classes`, or the classes of the built `dataset`), in the order given."""
    import torch

    if not images:
        raise PredictError("IMAGES: no image file given")
    if top_k < 1:
        raise PredictError(f"--top-k: {top_k}; expected an integer >= 1")
    names, template, key = class_set(trial, classes, dataset, data_root)
    trial.use_classes(names, template, key)
    bb = trial.model.backbone
    k = min(top_k, len(names))
    out = []
    for i in range(0, len(images), batch_size):
        chunk = list(images[i:i + batch_size])
        batch = read_images(chunk, bb.image_size, bb.mean, bb.std)
        with torch.no_grad(), trial.precision.autocast():
            logits = trial.model(batch.to(trial.device), shared=True)[0].float()  # [B, C]: its one member
        probs = logits.softmax(-1)
        top = probs.topk(k, dim=-1)
        for path, idx, p, row in zip(chunk, top.indices.tolist(), top.values.tolist(), logits.tolist()):
            out.append(Prediction(str(path), tuple((names[j], float(q), float(row[j])) for j, q in zip(idx, p))))
    return out


# Result key of an evaluation: the names a trial's own evaluation gives its splits (eval/<split>.json alike).
TEST_METRICS = {"all": "acc", "base": "base_acc", "novel": "novel_acc"}


def eval_metric(split: str, classes: str) -> str:
    if split == "test":
        return TEST_METRICS[classes]
    return f"{split}_acc" if classes == "all" else f"{split}_{classes}_acc"


@dataclass
class Evaluation:
    """The numbers of `evaluate`: the per-class record (hisf.class_results), its files, and the MLflow run."""

    record: dict[str, Any]
    files: list[Path]
    dataset: str
    split: str
    classes: str
    run_id: str | None = None
    experiment_id: str | None = None
    link: str | None = None

    @property
    def accuracy(self) -> float:
        return self.record["accuracy"]


def evaluate(trial: LoadedTrial, dataset: str | None = None, data_root: str | Path | None = None,
             split: str = "test", classes: str = "all", log: bool = True, tracking_uri: str | None = None,
             out_dir: str | Path | None = None, batch_size: int | None = None, ui_url: str | None = None,
             workdir: str | Path = "hisf-bench") -> Evaluation:
    """Accuracy, per-class accuracy and the confusion matrix of the trial on `split` of the built `dataset` (default:
    its own) over its `classes` (all, base or novel), counted as the engine counts a trial's own splits; with `log`, a
    new MLflow run in the source run's experiment tagged `hisf.source_run`, holding the metrics and eval/ artifacts.

    Written to `out_dir/eval/` (default: a temporary folder, kept only in the MLflow run)."""
    from hisf.class_results import class_results, write_class_results
    from hisf.engine.distributed import DistEnv
    from hisf.engine.evaluation import score
    from hisf.engine.trial_data import check_labels

    if classes not in TEST_METRICS:
        raise PredictError(f"--classes: {classes!r}; expected one of {list(TEST_METRICS)}")
    ds = open_built(trial, dataset, data_root, needs=(split,))
    from data_shards import DataError, make_loader

    try:
        subset = ds.select(split, shots=None, seed=trial.config.seed, classes=classes)
    except DataError as e:
        raise PredictError(f"--split {split}: {e}") from None
    if not len(subset):
        raise PredictError(f"--split {split}: dataset {ds.key!r} at {ds.path} has no {classes} images in its "
                           f"{split!r} split")
    trial.use_classes(subset.classnames, ds.template, ds.key)
    metric = eval_metric(split, classes)
    check_labels(subset, len(trial.model.classnames), metric)
    bb = trial.model.backbone
    loader = make_loader(subset, train=False, batch_size=batch_size or trial.config.train.eval_batch_size,
                         image_size=bb.image_size, mean=bb.mean, std=bb.std)
    env = DistEnv(0, 1, 0, trial.device, owns_group=False)
    scores = score(trial.model, loader, env, trial.precision.autocast, metric=metric, dataset=ds.key,
                   classnames=subset.classnames)
    result = Evaluation(class_results(scores.confusion[0], subset.classnames, metric, ds.key), [], ds.key, split,
                        classes)
    with tempfile.TemporaryDirectory(prefix="hisf-eval-") as tmp:
        folder = Path(out_dir) if out_dir is not None else Path(tmp)
        write_class_results(folder, scores.confusion[0], subset.classnames, metric, ds.key)
        result.files = sorted(p for p in (folder / "eval").rglob("*") if p.is_file())
        if log:
            from orchestrator.eval_tracking import log_evaluation

            log_evaluation(trial, result, folder / "eval", data_root=str(ds.path.parent), ui_url=ui_url,
                           tracking_uri=tracking_uri, workdir=workdir)
        if out_dir is None:
            result.files = []  # the temporary copies are gone; the run holds them
    return result
