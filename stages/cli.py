"""The ``wsss`` console script: every DVC stage, runnable directly with the same params.

Subcommands are imported only when one runs: ``wsss --help`` lists them from the table below
without importing torch (a test keeps the table equal to each command's own short help).

Every run also logs to ``cache/logs/<stage>.log`` (``$WSSS_LOG_DIR`` overrides the folder), named
like the DVC stage (``train_prompts@cls.log``). A stage stops when the process that started it
dies (``dvc repro`` killed with SIGKILL must not leave it computing into a store on its own), and an
operating-system failure while writing (disk full, read-only cache) ends it with one line naming
the path instead of a traceback.
"""
from __future__ import annotations

import errno
import importlib
import os

import click

from pipeline.errors import PipelineError
from stages.logs import configure_logging, log_to_file
from stages.watch import die_with_parent

# command name -> (module under stages/ that defines ``command``, its short help)
COMMANDS = {
    "prepare": ("prepare", "Index the dataset: image ids, sizes and image-level labels per split."),
    "sam-masks": ("sam_masks", "Quasi-superpixels (SAM masks by level) for every image of the train and eval splits."),
    "clip-features": ("clip_features", "Frozen-CLIP caches: last-block inputs of K training views and of the inference image."),
    "train-prompts": ("train_prompts", "Learn CoOp prompt contexts (classification or segmentation prompts)."),
    "cams": ("cams", "Softmax-GradCAMs (+ CAA) of every train image's present classes."),
    "seeds": ("seeds", "SAMS seeds for every image of the train split, with seed and CAM evaluation."),
    "train-segmenter": ("train_segmenter", "Train the final segmenter (DeepLabV3+) on the fine seeds of the train split."),
    "predict": ("predict", "Multi-scale + flip inference with SAMS post-processing; mIoU on the eval split."),
    "visualize": ("visualize", "PNG panels (image | masks by level | CAM | seed | ground truth) for a few ids."),
    "import-cams": ("import_cams", "Import external CAMs (``<id>.npz`` with ``cam`` and ``fg_cls``) into a CAM store."),
    "migrate-store": ("migrate_store", "Convert stores of the old one-folder-per-image layout to one zip per image, in place."),
    "configure": ("configure", "Switch params.yaml to the paper's setup for VOC, COCO or a custom dataset."),
    "report": ("report", "The method's numbers stage by stage (percent), from the stored metrics."),
    "demo-models": ("demo_models", "Train the demo CLIP and SAM on the procedural world, or evaluate them (--evaluate)."),
}

class StageError(click.ClickException):
    """A user-facing failure: one clear line, non-zero exit (what every :class:`PipelineError`
    of a command becomes)."""

    def format_message(self) -> str:
        return self.message


# OS errors that mean "the output location cannot take the write": reported in one line.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"stages.{COMMANDS[name][0]}").command

    def format_commands(self, ctx, formatter):
        # The static table: listing must not import every stage (and torch with it).
        rows = [(name, help_) for name, (_, help_) in sorted(COMMANDS.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx):
        # The subcommand's arguments are only in the context before Group.invoke consumes them.
        args = [*getattr(ctx, "_protected_args", []), *ctx.args]
        name = stage_name(args)
        if name is not None and not any(a in ("-h", "--help") for a in args):
            log_to_file(os.environ.get("WSSS_LOG_DIR", "cache/logs"), name, ["wsss", *args])
            die_with_parent()
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            # Every error of the library and the stages that a user can act on: one line.
            raise StageError(str(exc)) from exc
        except OSError as exc:
            if exc.errno not in _WRITE_ERRNOS:
                raise
            where = exc.filename or "the output"
            raise StageError(f"cannot write {where}: {exc.strerror or exc} "
                             "(free space or fix permissions, then rerun: finished work is kept)") from exc


def stage_name(args: list[str]) -> str | None:
    """The DVC stage name of a command line (``train-prompts --which cls`` -> train_prompts@cls)."""
    if not args or args[0] not in COMMANDS:
        return None
    name = COMMANDS[args[0]][0]
    for i, arg in enumerate(args[1:-1], start=1):
        if arg == "--which":
            return f"{name}@{args[i + 1]}"
    for arg in args[1:]:
        if arg.startswith("--which="):
            return f"{name}@{arg.split('=', 1)[1]}"
    return name


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (our own and the libraries').")
def main(verbose: bool) -> None:
    """Foundation-model-assisted WSSS: CLIP + SAM seeds, DVC stages."""
    configure_logging(verbose)


if __name__ == "__main__":
    main()
