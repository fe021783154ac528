"""`data.demo: true`: the demo dataset(s) and HiCroPL descriptions built under data.root, through data_shards' API."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from orchestrator.spec import ExperimentSpec, SpecError

# The tiny backbone reads 32 px images; storing the demo at 224 would only cost build time.
DEMO_IMAGE_SIZE = 32


def build_demo(spec: ExperimentSpec, out: TextIO | None = None) -> None:
    """Generate and build each dataset of the spec under data.root, unless already built there."""
    from data_shards import BuildOptions, DataError, build, write_demo
    from data_shards.demo import DESCRIPTIONS_FOLDER, write_descriptions

    root = Path(spec.data.root)
    out = out or sys.stdout
    if not (root / DESCRIPTIONS_FOLDER / "demo_prompt.json").is_file():
        # HiCroPL's text teacher reads them (experiments/demo.yaml points its row at this folder).
        write_descriptions(root / DESCRIPTIONS_FOLDER)
    raw = root / "_raw"
    for key in spec.data.datasets:
        if (root / key / "manifest.parquet").is_file():
            continue
        print(f"building demo data {key!r} under {root}", file=out)
        try:
            write_demo(raw)
            build(key, raw, root / key, BuildOptions(image_size=DEMO_IMAGE_SIZE), progress=False)
        except (DataError, OSError) as e:
            raise SpecError(f"{spec.path}: data.demo: building demo data {key!r} under {root} failed: {e}") from None
