"""docs/api.md's example runs as written, and its library calls give what the stages write."""
from __future__ import annotations

import contextlib
import os
import re

import numpy as np
import pytest
import torch

from dvc_project import REPO, dvc_env, make_project, sh
from pipeline.schemas import open_cams

pytestmark = pytest.mark.slow


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "api.md").read_text(), re.S)
    assert len(blocks) == 1, "docs/api.md holds one python example"
    return blocks[0]


def test_the_api_page_runs_as_written_and_equals_the_stages(tmp_path):
    env = dvc_env(tmp_path / "home")
    repo = tmp_path / "repo"
    make_project(repo, env, {"prompts": {"cls": {"iterations": 3, "warmup_iterations": 1,
                                                   "checkpoint_every": 3}},
                             "clip_features": {"n_views": 2}})
    sh("dvc", "repro", "cams@cls", cwd=repo, env=env)

    namespace: dict = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the stages ran (OMP_NUM_THREADS=1): the same summation order
    try:
        with contextlib.chdir(repo):
            exec(compile(_example(), str(REPO / "docs" / "api.md"), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    record, image, qs, cams, seed = (namespace[k] for k in ("record", "image", "qs", "cams", "seed"))

    # The CAMs of the library's calls are the cams stage's, bit for bit.
    stored = open_cams(repo / "cache" / "cams" / "cls.zarr").read(record.id)
    np.testing.assert_array_equal(cams["cam"], stored["cam"])
    np.testing.assert_array_equal(cams["fg_cls"], stored["fg_cls"])
    assert cams["cam_caa"].shape == cams["cam"].shape  # CaaConfig() refines (the demo's params do not)
    # Quasi-superpixels cover the image at three levels; the seed paints only the image's classes.
    assert len(qs) > 0 and qs.masks.shape[1:] == image.shape[:2]
    assert seed.shape == image.shape[:2] and seed.dtype == np.uint8
    assert set(np.unique(seed).tolist()) <= {0} | {c + 1 for c in record.labels}
    assert os.path.isfile(repo / "cache" / "prompts" / "cls.pt")
