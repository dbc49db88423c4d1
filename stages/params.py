"""Reading ``params.yaml`` once per stage, and the command-line options every stage shares.

The schema (one typed config per section, validated once) is :mod:`pipeline.params`; this module
only reads the file and checks its top-level sections against that schema.
"""
from __future__ import annotations

import os
from pathlib import Path

import click
import yaml

from pipeline.config import ConfigError
from pipeline.params import check_sections

PARAMS_OPTION = click.option(
    "--params", "params_path", default="params.yaml", show_default=True,
    type=click.Path(dir_okay=False), help="Parameter file (DVC's params.yaml).",
)

INDEX_OPTION = click.option(
    "--index", "index_dir", default="cache/index", show_default=True,
    type=click.Path(file_okay=False), help="Dataset index written by `wsss prepare`.",
)


def load_params(path: str | os.PathLike = "params.yaml") -> dict:
    """The parameter file as a mapping of sections (each read with :func:`pipeline.params.section`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file not found: {path}")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    check_sections(params, str(path))
    return params
