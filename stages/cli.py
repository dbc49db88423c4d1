"""The ``wsss`` console script: every DVC stage, runnable directly with the same params.

Subcommands are imported lazily, so ``wsss --help`` is fast and one stage's heavy imports do not
slow the others.
"""
from __future__ import annotations

import importlib

import click

from stages.common import configure_logging

# command name -> module under stages/ that defines ``command``
COMMANDS = {
    "prepare": "prepare",
    "sam-masks": "sam_masks",
    "clip-features": "clip_features",
    "train-prompts": "train_prompts",
    "cams": "cams",
    "seeds": "seeds",
    "train-segmenter": "train_segmenter",
    "predict": "predict",
    "visualize": "visualize",
    "import-cams": "import_cams",
    "configure": "configure",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(name for name, module in COMMANDS.items() if _exists(module))

    def get_command(self, ctx, name):
        module = COMMANDS.get(name)
        if module is None or not _exists(module):
            return None
        return importlib.import_module(f"stages.{module}").command


def _exists(module: str) -> bool:
    return importlib.util.find_spec(f"stages.{module}") is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Foundation-model-assisted WSSS: CLIP + SAM seeds, DVC stages."""
    configure_logging(verbose)


if __name__ == "__main__":
    main()
