"""The library's error type: a failure the user can act on, said in one line.

Every error the method raises on bad input (params, datasets, stores, checkpoints, images) derives
from :class:`PipelineError`; the ``wsss`` CLI turns each into a one-line message in one place
(``stages.cli``), and a notebook user can catch them all with one ``except``.
"""
from __future__ import annotations


class PipelineError(Exception):
    """A user-facing failure of the method's code; its message is one complete line."""
