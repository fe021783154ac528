"""A small real-image dataset in CoOp's layout (generated colour/shape classes) for the demo and the tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from data_shards.errors import DataError

# (folder, class name, colour, shape): colour and shape both separate the classes.
CLASSES = (
    ("red_circle", "red circle", (220, 40, 40), "circle"),
    ("green_square", "green square", (40, 180, 60), "square"),
    ("blue_triangle", "blue triangle", (50, 80, 230), "triangle"),
    ("yellow_cross", "yellow cross", (235, 210, 40), "cross"),
    ("magenta_ring", "magenta ring", (210, 50, 200), "ring"),
    ("cyan_bars", "cyan bars", (40, 200, 210), "bars"),
)


# What each shape looks like, in words: the demo's class descriptions (HiCroPL's text teacher reads them).
SHAPE_WORDS = {
    "circle": "a round shape with a smooth edge",
    "square": "a shape with four equal sides and four right angles",
    "triangle": "a shape with three straight sides, pointing up",
    "cross": "two bars crossing at right angles, like a plus sign",
    "ring": "a hollow circle: a thick outline with the background showing through the middle",
    "bars": "three upright stripes standing side by side",
}
# `data demo --out DATA` writes DATA/descriptions/demo_prompt.json: a CoPrompt-style folder (`<name>_prompt.json`).
DESCRIPTIONS_FOLDER = "descriptions"


def demo_descriptions(n_classes: int = len(CLASSES)) -> dict[str, list[str]]:
    """{class name: sentences} for the first n_classes demo classes, in CoPrompt's `{name: [sentences]}` shape."""
    out = {}
    for _, name, _, shape in CLASSES[:n_classes]:
        colour = name.split()[0]
        out[name] = [
            f"A {name} is a {colour} {shape} drawn on a grey, speckled background.",
            f"A {name} looks like {SHAPE_WORDS[shape]}, coloured {colour}.",
            f"The only object in a picture of a {name} is one {colour} {shape}, somewhere in the frame.",
        ]
    return out


def write_descriptions(folder: str | Path, n_classes: int = len(CLASSES)) -> Path:
    """Write FOLDER/demo_prompt.json (the demo classes' descriptions); returns the file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "demo_prompt.json"
    path.write_text(json.dumps(demo_descriptions(n_classes), indent=1))
    return path


def draw_sample(shape: str, colour: tuple[int, int, int], size: int, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(90, 150) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    for _ in range(size // 4):  # background speckle so images are not trivially identical
        x, y = rng.randrange(size), rng.randrange(size)
        d.point((x, y), fill=tuple(rng.randint(60, 190) for _ in range(3)))
    r = rng.uniform(0.22, 0.34) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    c = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in colour)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=c)
    elif shape == "square":
        d.rectangle(box, fill=c)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=c)
    elif shape == "cross":
        w = r / 3
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=c)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=c)
    elif shape == "ring":
        d.ellipse(box, outline=c, width=max(2, int(r / 3)))
    else:
        for k in range(3):
            x = cx - r + k * r * 0.8
            d.rectangle((x, cy - r, x + r * 0.4, cy + r), fill=c)
    return img


def write_demo(out: str | Path, n_classes: int = 6, train: int = 16, val: int = 4, test: int = 8,
               size: int = 64, seed: int = 0) -> Path:
    """Write OUT/demo/images/<class>/*.png, OUT/demo/split_zhou_Demo.json and the classes' descriptions
    OUT/descriptions/demo_prompt.json; returns OUT (the DATA root)."""
    if not 1 <= n_classes <= len(CLASSES):
        raise DataError(f"--classes: expected 1..{len(CLASSES)} (the demo has {len(CLASSES)} classes), got {n_classes}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file; expected a folder")
    image_dir = out / "demo" / "images"
    rng = random.Random(seed)
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, (folder, name, colour, shape) in enumerate(CLASSES[:n_classes]):
        (image_dir / folder).mkdir(parents=True, exist_ok=True)
        n = 0
        for s, count in (("train", train), ("val", val), ("test", test)):
            for _ in range(count):
                rel = f"{folder}/{folder}_{n:04d}.png"
                draw_sample(shape, colour, size, rng).save(image_dir / rel)
                split[s].append([rel, label, name])
                n += 1
    (out / "demo" / "split_zhou_Demo.json").write_text(json.dumps(split))
    write_descriptions(out / DESCRIPTIONS_FOLDER, n_classes)
    return out
