"""Torch files the pipeline writes and reads back (prompts, resume states, segmenter checkpoints).

They travel through ``cache/`` and DVC remotes, so they are data, never code (issue 24): they are
read with ``torch.load(weights_only=True)``, whose unpickler builds only tensors and plain
containers and refuses any other object instead of running its constructor. Writers hold
themselves to the same rule (:func:`check_plain` before every save), so what one run writes the
next one reads: a dataclass, numpy array or set in a saved state is a bug found at save time, not
a resume that fails days later.
"""
from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from typing import Any

import torch

from pipeline.atomic import atomic_path
from pipeline.errors import PipelineError

PLAIN_TYPES = (str, int, float, bool, type(None))
"""Leaf values besides tensors that the weights-only unpickler accepts and these files hold."""


class TensorFileError(PipelineError, ValueError):
    """A torch file cannot be read as data (truncated, foreign, or holding other objects); one line."""


def load(path: str | os.PathLike, what: str, remedy: str) -> Any:
    """``torch.load(path)`` restricted to tensors and plain data, on the CPU.

    ``what`` names the file's role in the message ("prompts checkpoint"), ``remedy`` says what to
    do ("rerun `wsss train-prompts --which cls`"). A file holding any other object (a pickled
    class, a numpy array, code) is not loaded: :class:`TensorFileError`, one line naming ``path``.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The unpickler's message is a page of advice to pass weights_only=False: exactly what
        # must not be done with a file from a shared cache. Keep the global it refused.
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if refused is None:  # not an object it refused: a malformed pickle
            raise TensorFileError(f"cannot read {what} {path} ({_first_line(exc)}): {remedy}") from exc
        raise TensorFileError(
            f"{what} {path} holds objects other than tensors and plain data (a pickled "
            f"{refused.group(1)}); it was not loaded, since unpickling it could run code: {remedy}") from exc
    except Exception as exc:  # zip and pickle errors of truncated or foreign files have many types
        raise TensorFileError(f"cannot read {what} {path} ({_first_line(exc)}): {remedy}") from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def load_dict(path: str | os.PathLike, what: str, remedy: str, keys: tuple[str, ...]) -> dict:
    """:func:`load` of a dict that must hold ``keys`` (one line naming the first one missing)."""
    state = load(path, what, remedy)
    if not isinstance(state, dict):
        raise TensorFileError(f"{what} {path} holds a {type(state).__name__}, not a dict: {remedy}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise TensorFileError(f"{what} {path} lacks {missing[0]!r} (written by other code?): {remedy}")
    return state


def check_plain(obj: Any, where: str = "") -> None:
    """Raise TypeError unless ``obj`` is tensors, str/int/float/bool/None, and dicts (ordered or
    not), lists and tuples of them (dict keys str or int): what :func:`load` reads back."""
    if isinstance(obj, torch.Tensor) or type(obj) in PLAIN_TYPES:
        return
    if type(obj) in (list, tuple):
        for i, item in enumerate(obj):
            check_plain(item, f"{where}[{i}]")
        return
    if type(obj) in (dict, OrderedDict):  # state_dict() is an OrderedDict
        for key, item in obj.items():
            if type(key) not in (str, int):
                raise TypeError(f"saved state {where or '(root)'} has a {type(key).__name__} key {key!r}")
            check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"saved state {where or '(root)'} is a {type(obj).__module__}.{type(obj).__name__}, "
                    "not a tensor or plain data (it could not be loaded back with weights_only=True)")


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` of plain data (:func:`check_plain`) to a temporary name beside ``path``,
    then renamed over it: readers never see half a file."""
    check_plain(obj)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # Through a file object: torch names the zip's top folder after a path's file name, so
        # saving to the temporary name would make equal states differ in bytes (and in DVC).
        torch.save(obj, f)
