"""``wsss report``: the method's numbers, stage by stage, from the stored metrics (recomputes nothing).

The ablation of the method in one table: quasi-superpixels per image, classification CAMs (raw and
with CAA, at their best background power), coarse and fine seeds, and the segmenter's val mIoU raw
and with SAMS post-processing, all in percent. ``--json`` prints the same as one JSON object.
A metrics file that does not exist yet (a stage not run) leaves its rows empty. Quasi-superpixels
from ``sam.model: world-oracle`` (the demo world's own masks, not a SAM) are flagged
(``sam_oracle``) and named under the table.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from pipeline.errors import PipelineError

METRICS_DIR = "cache/metrics"
ORACLE_NOTE = ("SAM: world-oracle stand-in (the demo world's own whole/part/sub-part masks through "
               "the same filtering, NMS and store), not a trained SAM.")

# (JSON key, stage, label, metrics file, path inside it)
ROWS: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("masks_per_image", "sam_masks", "quasi-superpixels per image", "sam_masks.json", ("masks_per_image",)),
    ("three_level_fraction", "sam_masks", "images with all 3 levels (0-1)", "sam_masks.json", ("three_level_fraction",)),
    ("background_only_miou", "seeds@coarse", "all-background map mIoU", "seeds_coarse.json", ("background_only", "miou")),
    ("cam_miou", "cams@cls", "CAM mIoU (best bg power)", "seeds_coarse.json", ("cam", "best_miou")),
    ("cam_caa_miou", "cams@cls", "CAM + CAA mIoU", "seeds_coarse.json", ("cam_caa", "best_miou")),
    ("coarse_seed_miou", "seeds@coarse", "coarse seed mIoU", "seeds_coarse.json", ("seed", "miou")),
    ("seg_cam_miou", "cams@seg", "seg-prompt CAM mIoU", "seeds_fine.json", ("cam", "best_miou")),
    ("seg_cam_caa_miou", "cams@seg", "seg-prompt CAM + CAA mIoU", "seeds_fine.json", ("cam_caa", "best_miou")),
    ("fine_seed_miou", "seeds@fine", "fine seed mIoU", "seeds_fine.json", ("seed", "miou")),
    ("predict_raw_miou", "predict", "segmenter val mIoU, raw", "predict.json", ("raw", "miou")),
    ("predict_post_miou", "predict", "segmenter val mIoU, + SAMS", "predict.json", ("postprocessed", "miou")),
)


def _dig(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def collect(metrics_dir: Path) -> dict[str, Any]:
    """The report's values (None where a file or entry is missing), ``untrained`` (any file) and
    ``sam_oracle`` (the quasi-superpixels came from the demo world's oracle, not a SAM)."""
    files: dict[str, Any] = {}
    for name in sorted({row[3] for row in ROWS}):
        path = metrics_dir / name
        if path.is_file():
            try:
                files[name] = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise PipelineError(f"{path}: not valid JSON ({exc})") from exc
    values: dict[str, Any] = {key: _dig(files.get(name), path) for key, _, _, name, path in ROWS}
    values["untrained"] = any(bool(data.get("untrained")) for data in files.values())
    values["sam_oracle"] = bool((files.get("sam_masks.json") or {}).get("sam_oracle"))
    values["missing"] = sorted({row[3] for row in ROWS} - set(files))
    return values


def table(values: dict[str, Any]) -> str:
    """A narrow (about 60 columns) text table of ``values``."""
    lines = [f"{'stage':<13} {'':<31} {'value':>8}", "-" * 54]
    for key, stage, label, _, _ in ROWS:
        v = values[key]
        text = "n/a" if v is None else (f"{v:.2f}" if key == "three_level_fraction" else f"{v:.1f}")
        lines.append(f"{stage:<13} {label:<31} {text:>8}")
    lines.append("-" * 54)
    lines.append("mIoU in percent." + (" Untrained (random) models: numbers check plumbing only."
                                        if values["untrained"] else ""))
    if values["sam_oracle"]:
        lines.append(ORACLE_NOTE)
    if values["missing"]:
        lines.append("Not run yet: " + ", ".join(values["missing"]))
    return "\n".join(lines)


@click.command("report")
@click.option("--metrics-dir", default=METRICS_DIR, show_default=True,
              type=click.Path(file_okay=False), help="Folder of the stages' metrics JSON files.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def command(metrics_dir: str, as_json: bool) -> None:
    """The method's numbers stage by stage (percent), from the stored metrics."""
    values = collect(Path(metrics_dir))
    if as_json:
        click.echo(json.dumps(values, indent=1))
    else:
        click.echo(table(values))
