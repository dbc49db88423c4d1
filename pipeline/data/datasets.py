"""The dataset index: which images a split holds, their sizes and image-level labels.

``prepare`` writes one JSON file per split under ``cache/index/``; every later stage reads it with
:func:`load_split`. Label conventions (all datasets): 0 background, c+1 foreground class c,
255 ignore; image-level labels are the 0-based foreground classes present in the ground truth.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from pipeline.errors import PipelineError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

IGNORE = 255


class DatasetError(PipelineError, ValueError):
    """The dataset on disk does not match its declared layout."""


@dataclass(frozen=True)
class Record:
    id: str
    image: str
    """Path of the image file."""
    label: str | None
    """Path of the ground-truth label map, None when the split has none."""
    height: int
    width: int
    labels: tuple[int, ...]
    """0-based foreground classes present in the image."""
    error: str | None = None
    """Why the image was skipped (``on_bad_image: skip``); None for usable images."""
    digest: str | None = None
    """Content digest of the image file (``pipeline.data.imageio.image_digest``), recorded by
    prepare; per-image artifacts record what they were computed from with it."""


@dataclass
class SplitIndex:
    dataset: str
    split: str
    class_names: list[str]
    records: list[Record] = field(default_factory=list)

    def good(self) -> list[Record]:
        return [r for r in self.records if r.error is None]

    def skipped(self) -> list[Record]:
        return [r for r in self.records if r.error is not None]

    def has_ground_truth(self) -> bool:
        return any(r.label is not None for r in self.good())

    def to_json(self) -> str:
        return json.dumps(
            {
                "dataset": self.dataset,
                "split": self.split,
                "class_names": list(self.class_names),
                "records": [asdict(r) for r in self.records],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> "SplitIndex":
        data = json.loads(text)
        records = [Record(**{**r, "labels": tuple(r["labels"])}) for r in data["records"]]
        return cls(data["dataset"], data["split"], list(data["class_names"]), records)


def split_path(index_dir: str | os.PathLike, split: str) -> Path:
    return Path(index_dir) / f"{split}.json"


def load_split(index_dir: str | os.PathLike, split: str) -> SplitIndex:
    path = split_path(index_dir, split)
    if not path.is_file():
        available = sorted(p.stem for p in Path(index_dir).glob("*.json")) if Path(index_dir).is_dir() else []
        raise DatasetError(
            f"no index for split {split!r} at {path} (available: {', '.join(available) or 'none'}; run `wsss prepare`)"
        )
    return SplitIndex.from_json(path.read_text())


def labels_from_mask(mask: np.ndarray, n_classes: int) -> tuple[int, ...]:
    """0-based foreground classes present in a label map (0 background, 255 ignored)."""
    values = np.unique(mask)
    values = values[(values >= 1) & (values <= n_classes)]
    return tuple(int(v) - 1 for v in values)


def parse_class_list(text: str) -> list[str]:
    """One class name per line; blank lines and '#' comments ignored; 'background' not allowed."""
    names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    names = [n for n in names if n]
    if not names:
        raise DatasetError("the class list is empty")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DatasetError(f"duplicate class names in the class list: {', '.join(dupes)}")
    if any(n.lower() == "background" for n in names):
        raise DatasetError("the class list holds foreground classes only; remove 'background'")
    return names


def parse_labels_file(text: str, fmt: str, class_names: Iterable[str],
                      source: str = "the labels file") -> dict[str, tuple[int, ...]]:
    """Image id -> 0-based class indices, from CSV (``id,names`` with names split on ';' or '|')
    or JSON (``{id: [names]}``). Errors name ``source`` and, where there is one, the line."""
    index = {n: i for i, n in enumerate(class_names)}
    raw: dict[str, list[str]] = {}
    lines: dict[str, int] = {}
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: "
                               f"{exc.msg}") from exc
        if not isinstance(data, Mapping):
            raise DatasetError(f"{source}: a JSON labels file maps image id -> list of class names, "
                               f"got {type(data).__name__}")
        for image_id, names in data.items():
            if isinstance(names, str):
                names = [names]
            if not isinstance(names, list):
                raise DatasetError(f"{source}: image {image_id}: expected a list of class names, "
                                   f"got {names!r}")
            raw[str(image_id)] = [str(n).strip() for n in names]
    elif fmt == "csv":
        for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
            if not row or not "".join(row).strip() or row[0].strip().startswith("#"):
                continue
            if row[0].strip().lower() in ("id", "image", "image_id") and len(raw) == 0:
                continue  # header
            image_id = row[0].strip()
            if image_id in raw:
                raise DatasetError(f"{source}, line {lineno}: image {image_id} is listed twice "
                                   f"(first on line {lines[image_id]})")
            names = ",".join(row[1:]).replace("|", ";").split(";")
            raw[image_id] = [n.strip() for n in names if n.strip()]
            lines[image_id] = lineno
    else:
        raise DatasetError(f"labels file format must be csv or json, got {fmt!r}")
    if not raw:
        raise DatasetError(f"{source} has no image entries (expected "
                           + ('{"<id>": ["<class>", ...]}' if fmt == "json" else '"<id>,<class>;<class>" rows')
                           + ")")
    out = {}
    for image_id, names in raw.items():
        unknown = [n for n in names if n not in index]
        if unknown:
            where = f"{source}, line {lines[image_id]}" if image_id in lines else source
            raise DatasetError(f"{where}: image {image_id}: unknown class name {unknown[0]!r} "
                               f"(the class list has {', '.join(index)})")
        out[image_id] = tuple(sorted({index[n] for n in names}))
    return out
