"""The catalogue: each benchmark dataset's key, prompt template and how to read its on-disk layout."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data_shards import sources
from data_shards.errors import DataError
from data_shards.sources import Listing

DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class DatasetEntry:
    key: str
    template: str
    # DATA root -> (classnames, records per split); for the generic sources `root` is the dataset folder.
    read: Callable[[Path], Listing]
    description: str


def _coop(folder: str, image_sub: str, split_name: str, renames: dict | None = None) -> Callable[[Path, str], Listing]:
    def read(root: Path, template: str) -> Listing:
        dataset_dir = sources.require_dir(root / folder, "dataset")
        names, splits = sources.read_split_json(dataset_dir / f"split_zhou_{split_name}.json",
                                                dataset_dir / image_sub if image_sub else dataset_dir, renames)
        return Listing(names, template, splits)

    return read


def _eurosat_renames() -> dict[str, str]:
    return json.loads((Path(__file__).parent / "classnames" / "eurosat_renames.json").read_text())


def _entry(key: str, template: str, reader, description: str) -> DatasetEntry:
    def read(root: Path) -> Listing:
        listing = reader(Path(root), template)
        if not listing.templates:
            listing.templates = (listing.template,)
        return listing

    return DatasetEntry(key, template, read, description)


def _listing(names_splits, template: str) -> Listing:
    names, splits = names_splits
    return Listing(names, template, splits)


def _simple(fn):
    return lambda root, template: _listing(fn(root), template)


def _variant(sub: str, numbered: bool):
    return lambda root, template: _listing(sources.read_imagenet_variant(root / sub, root, numbered), template)


def _image_folder(root: Path, template: str) -> Listing:
    names, splits, split_rule = sources.read_image_folder(root)
    return Listing(names, template, splits, notes={"split_rule": split_rule} if split_rule else {})


def _clip_benchmark(root: Path, template: str) -> Listing:
    names, splits, templates = sources.read_clip_benchmark(root)
    return Listing(names, templates[0] if templates else template, splits, templates)


CATALOGUE: dict[str, DatasetEntry] = {e.key: e for e in [
    _entry("imagenet", "a photo of a {}.", _simple(lambda r: sources.read_imagenet(r / "imagenet")),
           "imagenet/images/{train,val}/<wnid>/ + imagenet/classnames.txt"),
    _entry("caltech101", "a photo of a {}.", _coop("caltech-101", "101_ObjectCategories", "Caltech101"),
           "caltech-101/101_ObjectCategories + split_zhou_Caltech101.json"),
    _entry("oxford_pets", "a photo of a {}, a type of pet.", _coop("oxford_pets", "images", "OxfordPets"),
           "oxford_pets/images + split_zhou_OxfordPets.json"),
    _entry("stanford_cars", "a photo of a {}.", _coop("stanford_cars", "", "StanfordCars"),
           "stanford_cars/ + split_zhou_StanfordCars.json"),
    _entry("oxford_flowers", "a photo of a {}, a type of flower.", _coop("oxford_flowers", "jpg", "OxfordFlowers"),
           "oxford_flowers/jpg + split_zhou_OxfordFlowers.json"),
    _entry("food101", "a photo of {}, a type of food.", _coop("food-101", "images", "Food101"),
           "food-101/images + split_zhou_Food101.json"),
    _entry("fgvc_aircraft", "a photo of a {}, a type of aircraft.", _simple(lambda r: sources.read_fgvc(r / "fgvc_aircraft")),
           "fgvc_aircraft/images + images_variant_{train,val,test}.txt + variants.txt"),
    _entry("sun397", "a photo of a {}.", _coop("sun397", "SUN397", "SUN397"),
           "sun397/SUN397 + split_zhou_SUN397.json"),
    _entry("dtd", "{} texture.", _coop("dtd", "images", "DescribableTextures"),
           "dtd/images + split_zhou_DescribableTextures.json"),
    _entry("eurosat", "a centered satellite photo of {}.", lambda r, t: _coop("eurosat", "2750", "EuroSAT", _eurosat_renames())(r, t),
           "eurosat/2750 + split_zhou_EuroSAT.json (class names renamed as CoOp does)"),
    _entry("ucf101", "a photo of a person doing {}.", _coop("ucf101", "UCF-101-midframes", "UCF101"),
           "ucf101/UCF-101-midframes + split_zhou_UCF101.json"),
    _entry("imagenetv2", "a photo of a {}.", _variant("imagenetv2/imagenetv2-matched-frequency-format-val", True),
           "imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/ (test only)"),
    _entry("imagenet_sketch", "a photo of a {}.", _variant("imagenet-sketch/images", False),
           "imagenet-sketch/images/<wnid>/ (test only)"),
    _entry("imagenet_a", "a photo of a {}.", _variant("imagenet-adversarial/imagenet-a", False),
           "imagenet-adversarial/imagenet-a/<wnid>/ (test only, 200 classes)"),
    _entry("imagenet_r", "a photo of a {}.", _variant("imagenet-rendition/imagenet-r", False),
           "imagenet-rendition/imagenet-r/<wnid>/ (test only, 200 classes)"),
    _entry("demo", "a photo of a {}.", _coop("demo", "images", "Demo"),
           "demo/images + split_zhou_Demo.json (written by `hisf-bench data demo`)"),
    # Generic sources: --root is the dataset folder itself.
    _entry("imagefolder", DEFAULT_TEMPLATE, _image_folder, "ROOT/<class>/ or ROOT/{train,val,test}/<class>/"),
    _entry("clip_benchmark", DEFAULT_TEMPLATE, _clip_benchmark,
           "ROOT/classnames.txt, zeroshot_classification_templates.txt, <split>/nshards.txt, <split>/N.tar"),
]}

BENCHMARK_11 = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
IMAGENET_VARIANTS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def get_entry(key: str) -> DatasetEntry:
    if key not in CATALOGUE:
        raise DataError(f"dataset {key!r}: unknown key; expected one of {sorted(CATALOGUE)}")
    return CATALOGUE[key]


# Sources that hold any user's data: a built one is named by the user (`--name`, default the --out folder's
# name), and specs, reports and MLflow tags use that name as they use a catalogue key.
GENERIC_SOURCES = ("imagefolder", "clip_benchmark")
# Names become folder names, trial ids, ':'-separated Optuna study names and MLflow tags: keep them plain.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def dataset_name(source: str, name: str | None, out: str | Path) -> str:
    """The name a build of `source` into `out` is recorded under: a catalogue dataset keeps its key; a
    generic source takes `name`, or the out folder's name, which must be plain and not a catalogue key."""
    get_entry(source)
    if source not in GENERIC_SOURCES:
        if name is not None and name != source:
            raise DataError(f"--name {name!r}: catalogue dataset {source!r} is always named {source!r}; "
                            f"--name names {' / '.join(GENERIC_SOURCES)} builds")
        return source
    origin = "--name" if name is not None else f"the --out folder's name ({out}; no --name given)"
    chosen = name if name is not None else Path(out).resolve().name
    if not NAME_PATTERN.fullmatch(chosen):
        raise DataError(f"dataset name {chosen!r} from {origin}: expected 1-64 letters, digits, '_' or '-', "
                        "starting with a letter or digit; pass --name NAME")
    if chosen.lower() in CATALOGUE:
        raise DataError(f"dataset name {chosen!r} from {origin} is a catalogue key, so specs could not tell this "
                        f"{source} build from the catalogue's {chosen.lower()!r}; pass --name with another name "
                        f"(e.g. --name my_{chosen.lower()})")
    return chosen
