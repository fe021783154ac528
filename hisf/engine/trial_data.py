"""The engine's data glue: which splits and class sets a protocol trains and evaluates on (docs/protocols.md), via data_shards."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from data_shards import DataError  # the engine's data errors are data_shards' own (re-raised, never wrapped twice)

from hisf.config import ConfigError, TrialConfig
from hisf.engine.distributed import DistEnv


@dataclass
class EvalSet:
    metric: str  # result key: base_acc, novel_acc, acc, target/<key>
    subset: Any  # data_shards Subset (test split)
    template: str
    dataset: str = ""  # catalogue key of the subset's dataset (HiCroPL's text teacher reads its descriptions)


@dataclass
class TrialData:
    cfg: TrialConfig
    env: DistEnv
    template: str
    train: Any  # K-shot training Subset
    val: Any  # validation Subset of the training classes (min(K, 4) per class)
    evals: list[EvalSet]
    image_mode: str = "fast"  # the source dataset's build mode: "exact" (CoOp's pixels) or "fast" (re-encoded)
    # BuiltDataset.fingerprint of every dataset the trial opened (the source, the targets it evaluates): what the
    # trial's resume identity compares, wherever the folders live.
    fingerprints: dict[str, str] = field(default_factory=dict)
    image_size: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def describe(self) -> dict[str, Any]:
        """What the trial's data is, for trackers (TrialCallback.on_trial_start)."""
        left_out = self.train.left_out + self.val.left_out + sum(ev.subset.left_out for ev in self.evals)
        return {"image_mode": self.image_mode, "dataset": self.cfg.data.dataset, "bad_images_left_out": left_out}

    def bind(self, backbone: Any, cfg: TrialConfig) -> None:
        """Take the image size and normalisation from the backbone (CLIP's mean/std)."""
        self.image_size, self.mean, self.std = int(backbone.image_size), tuple(backbone.mean), tuple(backbone.std)

    def loader(self, subset: Any, train: bool = False, epoch: int = 0):
        """A data_shards loader over `subset` at the backbone's preprocessing: training (per-rank batch, seeded
        order and augmentation of `epoch`) or evaluation (eval batch size, every sample once over the ranks)."""
        from data_shards import make_loader

        if not self.image_size:
            raise RuntimeError("TrialData.bind(backbone) must be called before loaders are made")
        tc = self.cfg.train
        return make_loader(subset, train=train, batch_size=tc.batch_size if train else tc.eval_batch_size,
                           image_size=self.image_size, mean=self.mean, std=self.std, seed=self.cfg.seed,
                           epoch=epoch, rank=self.env.rank, world_size=self.env.world_size,
                           num_workers=self.cfg.data.num_workers, pin_memory=self.env.device.type == "cuda")

    def train_loader(self, epoch: int):
        return self.loader(self.train, True, epoch)

    def val_loader(self):
        return self.loader(self.val, False)


def open_built(root: str, key: str, field_name: str, needs: tuple[str, ...]):
    """The built dataset `key` under `root`, holding the splits `needs`; ConfigError/DataError naming `field_name`
    and how to build it otherwise."""
    from data_shards import open_dataset

    path = Path(root) / key
    if not path.is_dir():
        from data_shards.catalogue import CATALOGUE, GENERIC_SOURCES

        how = (f"--dataset {key} --root DATA" if key in CATALOGUE else
               f"--dataset {'|'.join(GENERIC_SOURCES)} --root YOUR_FOLDER --name {key}")
        raise ConfigError(f"{field_name}: no built dataset {key!r} at {path} (data.root={root!r}); build it with "
                          f"`hisf-bench data build {how} --out {path}`")
    try:
        ds = open_dataset(path)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged build (unreadable manifest, bad JSON): one error naming it
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise DataError(f"{field_name}: cannot open the built dataset at {path}: {type(e).__name__}: {reason}; "
                        f"rebuild it with `hisf-bench data build ... --out {path}`") from e
    if ds.key != key:
        raise ConfigError(f"{field_name}: {path} holds dataset {ds.key!r}, expected {key!r}")
    missing = [s for s in needs if s not in ds.splits]
    if missing:
        raise ConfigError(f"{field_name}: dataset {key!r} at {path} has no {missing[0]!r} split "
                          f"(has {list(ds.splits)}); protocol needs {list(needs)}")
    return ds


def open_trial_data(cfg: TrialConfig, env: DistEnv) -> TrialData:
    """Open the source (and target) datasets and select the protocol's subsets; every error is raised here."""
    dc, tc = cfg.data, cfg.train
    ds = open_built(dc.root, dc.dataset, "data.dataset", ("train", "val", "test") if cfg.evaluate_test else ("train", "val"))
    train_classes = "base" if cfg.protocol == "base2new" else "all"
    train = ds.select("train", shots=dc.shots, seed=cfg.seed, classes=train_classes)
    # docs/protocols.md: validation gets min(K, 4) per class, drawn after the K-shot train draw on the same seeded
    # RNG (CoOp); `select("val", shots=K)` does both, so K goes in, not min(K, 4).
    val = ds.select("val", shots=dc.shots, seed=cfg.seed, classes=train_classes)
    fingerprints = {dc.dataset: ds.fingerprint}
    global_batch = tc.batch_size * env.world_size
    if tc.epochs > 0 and len(train) < global_batch:
        raise ConfigError(f"train.batch_size: {tc.batch_size} per rank x {env.world_size} rank(s) = {global_batch} "
                          f"is more than the {len(train)} training samples of {dc.dataset!r} ({dc.shots} shots, "
                          f"{train_classes} classes): not one full batch; lower the batch size or the world size")
    if len(val) == 0:
        raise ConfigError(f"data.dataset: {dc.dataset!r} has an empty validation split for its {train_classes} classes")
    if not cfg.evaluate_test:
        evals = []
    elif cfg.protocol == "base2new":
        evals = [EvalSet("base_acc", ds.select("test", shots=None, seed=cfg.seed, classes="base"), ds.template,
                         dc.dataset),
                 EvalSet("novel_acc", ds.select("test", shots=None, seed=cfg.seed, classes="novel"), ds.template,
                         dc.dataset)]
    else:
        evals = [EvalSet("acc", ds.select("test", shots=None, seed=cfg.seed, classes="all"), ds.template, dc.dataset)]
    for i, key in enumerate(dc.targets if cfg.evaluate_test else ()):
        target = open_built(dc.root, key, f"data.targets[{i}]", ("test",))
        evals.append(EvalSet(f"target/{key}", target.select("test", shots=None, seed=cfg.seed, classes="all"),
                             target.template, key))
        fingerprints[key] = target.fingerprint
    return TrialData(cfg, env, ds.template, train, val, evals, image_mode=ds.image_mode, fingerprints=fingerprints)


def check_labels(subset: Any, n_classes: int, what: str) -> None:
    """Every label of a subset lies in the model's class set: checked on the host once per class set/loader.

    On CUDA an out-of-range label reaches cross_entropy as an asynchronous device-side assert that poisons
    the process (no message, the Tune actor dies); here it is a clear error before the first batch.
    """
    labels = np.asarray(subset.labels)
    bad = labels[(labels < 0) | (labels >= n_classes)]
    if len(bad):
        raise DataError(f"{what}: label {int(bad[0])} of the {subset.split!r} subset at {subset.root} lies outside the "
                         f"model's {n_classes} classes (expected 0..{n_classes - 1}; {len(bad)} bad label(s))")
