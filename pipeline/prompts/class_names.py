"""Prompt names of the foreground classes and the background prompts (algorithms.md §2).

The renames (``bird avian``, ``person with clothes,people,human``, ...) are the authors' prompt
engineering; they are the names put in prompts, never the dataset's class names. (Underscores in
any name become spaces when the prompt is built: ``pipeline.prompts.learner.prompt_name``.)
"""
from __future__ import annotations

from pipeline.data.datasets import COCO_CLASSES as COCO_CLASS_NAMES
from pipeline.data.datasets import VOC_CLASSES as VOC_CLASS_NAMES

VOC_PROMPT_NAMES = (
    "aeroplane", "bicycle", "bird avian", "boat", "bottle", "bus", "car", "cat", "chair seat", "cow",
    "diningtable", "dog", "horse", "motorbike", "person with clothes,people,human", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor screen",
)

VOC_BACKGROUND_NAMES = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
    "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road",
    "rock", "street", "valley", "bridge", "sign",
)

# COCO drops the two VOC background names that are (or are parts of) COCO classes.
COCO_BACKGROUND_NAMES = tuple(n for n in VOC_BACKGROUND_NAMES if n not in ("keyboard", "sign"))


COCO_RENAMES = {
    "person": "person with clothes,people,human", "motorcycle": "motorbike", "airplane": "aeroplane",
    "bird": "bird avian", "backpack": "backpack,bag", "umbrella": "umbrella,parasol",
    "handbag": "handbag,purse", "tie": "necktie", "baseball glove": "glove", "spoon": "dessertspoon",
    "chair": "chair seat", "couch": "sofa", "potted plant": "pottedplant",
    "dining table": "diningtable", "tv": "tvmonitor screen", "remote": "remote control",
    "hair drier": "hairdrier,blowdrier",
    # The reference's COCO prompt names spell it so; kept for fidelity (the class name, shown in
    # metrics and plots, stays "snowboard").
    "snowboard": "sknowboard",
}

COCO_PROMPT_NAMES = tuple(COCO_RENAMES.get(n, n) for n in COCO_CLASS_NAMES)



def prompt_names(class_names: list[str] | tuple[str, ...], dataset: str) -> tuple[str, ...]:
    """Foreground prompt names for a dataset's class names (renames of §2 for VOC and COCO).

    Other datasets (demo, custom) use their class names as they are.
    """
    if dataset == "voc":
        table = dict(zip(VOC_CLASS_NAMES, VOC_PROMPT_NAMES))
    elif dataset == "coco":
        table = dict(zip(COCO_CLASS_NAMES, COCO_PROMPT_NAMES))
    else:
        table = {}
    return tuple(table.get(n, n) for n in class_names)


def background_names(dataset: str) -> tuple[str, ...]:
    """Background prompt names: COCO's 23, else VOC's 25 (also used for demo/custom data)."""
    return COCO_BACKGROUND_NAMES if dataset == "coco" else VOC_BACKGROUND_NAMES
