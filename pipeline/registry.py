"""Choices by name: one small registry type behind every ``register_*`` of the library.

Datasets (``dataset.name``), SAM generators (``sam.model``), SAM architectures and their known
weights, known CLIP files and segmenter architectures are each a :class:`Registry`. The core
registers its own entries; the embedded demo registers its entries in ``pipeline/demo/registry.py``,
which every lookup imports on first use (:data:`PLUGINS`: the one place the core names the demo),
so no core module or stage branches on a demo name.

Entries are plain data, or ``"package.module:callable"`` strings resolved with :func:`resolve` when
the thing is built: looking names up (``pipeline.params`` validates every name) imports no
implementation, so a stage's import closure (its code deps in dvc.yaml) stays its own.
"""
from __future__ import annotations

import importlib
from typing import Any, Generic, Iterator, TypeVar

from pipeline.errors import PipelineError

T = TypeVar("T")

PLUGINS = ("pipeline.demo.registry",)
"""Modules that register entries on import; loaded before the first lookup."""
_MISSING = object()


def load_plugins() -> None:
    for name in PLUGINS:
        importlib.import_module(name)


def resolve(ref: str) -> Any:
    """The object a ``"package.module:callable"`` string names (imported now)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


class Registry(Generic[T]):
    """Entries of one kind by name, in registration order (the core's first).

    Args:
        what: the kind, as the error of an unknown name says it (``unknown <what> 'x' (known: ...)``).
        entries: the core's entries; kept by reference (a module may expose the same dict).
        error: the error type of an unknown name (a :class:`PipelineError`).
        sort_known: list the known names sorted (else in registration order) in that error.
    """

    def __init__(self, what: str, entries: dict[str, T] | None = None,
                 error: type[PipelineError] = PipelineError, sort_known: bool = False):
        self.what = what
        self.entries: dict[str, T] = entries if entries is not None else {}
        self.error = error
        self.sort_known = sort_known

    def register(self, name: str, entry: T) -> None:
        """Make ``name`` a valid choice (a later registration of the same name replaces it)."""
        self.entries[name] = entry

    def names(self) -> tuple[str, ...]:
        load_plugins()
        return tuple(self.entries)

    def all(self) -> dict[str, T]:
        """The live mapping of every entry, the plugins' included."""
        load_plugins()
        return self.entries

    def get(self, name: str, default: Any = None) -> T | Any:
        load_plugins()
        return self.entries.get(name, default)

    def __getitem__(self, name: str) -> T:
        """The entry of ``name``; an unknown name is ``error``, naming the known ones."""
        entry = self.get(name, _MISSING)
        if entry is _MISSING:
            known = sorted(self.entries) if self.sort_known else list(self.entries)
            raise self.error(f"unknown {self.what} {name!r} (known: {', '.join(known)})")
        return entry

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
