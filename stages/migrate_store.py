"""``wsss migrate-store``: convert stores of the previous layout (one folder of zarr files per
image) to the current one (one zip file per image), in place, keeping every computed image.

Each image's arrays are rewritten with the same codecs and chunk shapes, so every chunk keeps its
bytes; the store's attributes (fingerprint included) are kept, so the producing stage resumes the
converted store instead of recomputing it. A killed conversion is finished by running it again.
"""
from __future__ import annotations

import logging

import click

from pipeline.store import finish, migrate_legacy

log = logging.getLogger("wsss.migrate_store")


@click.command("migrate-store")
@click.argument("stores", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
def command(stores: tuple[str, ...]) -> None:
    """Convert stores of the old one-folder-per-image layout to one zip per image, in place."""
    for path in stores:
        converted = migrate_legacy(path)
        finish(path)
        log.info("migrate-store: %s: %d images converted", path, converted)
