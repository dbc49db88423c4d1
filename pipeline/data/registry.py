"""Dataset sources by ``dataset.name``: what ``prepare`` indexes, and how.

VOC, COCO and the custom layout are the core's (builders in :mod:`pipeline.data.sources`); the
demo registers its procedural world from ``pipeline/demo/registry.py``. Entries are plain data and
``"package.module:callable"`` strings, resolved when a split is built: ``pipeline.params``
validates ``dataset.name`` against :func:`source_names`, and that must not import any builder.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.registry import Registry


@dataclass(frozen=True)
class DatasetSource:
    """How one ``dataset.name`` becomes split indexes."""

    build: str
    """``"package.module:callable"``: ``(root, split, cfg, progress) -> SplitIndex``, the index of
    ``split`` of the dataset tree at ``root`` (``cfg``: the ``DatasetConfig``)."""
    generate: str | None = None
    """``"package.module:callable"``: ``(root, cfg, progress) -> None``, for a source that writes
    its own dataset tree at ``root`` (inside the index folder, moving with it) instead of reading
    ``dataset.root``; None: the tree is ``dataset.root``."""


SOURCES: Registry[DatasetSource] = Registry("dataset")
"""``dataset.name`` -> :class:`DatasetSource`."""


def register_source(name: str, source: DatasetSource) -> None:
    """Make ``name`` a valid ``dataset.name``."""
    SOURCES.register(name, source)


def source_names() -> tuple[str, ...]:
    """Every known ``dataset.name``, in registration order (the core's first)."""
    return SOURCES.names()


def dataset_source(name: str) -> DatasetSource:
    return SOURCES[name]


for _name, _build in (("voc", "voc_split"), ("coco", "coco_split"), ("custom", "custom_split")):
    register_source(_name, DatasetSource(build=f"pipeline.data.sources:{_build}"))
