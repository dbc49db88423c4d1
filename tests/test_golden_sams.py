"""SAMS seeds reproduce the authors' implementation exactly (golden vectors, algorithms.md §5)."""
import numpy as np
import pytest

from pipeline.seeds.sams import sams_seed
from conftest import golden_params


@pytest.mark.parametrize("path", golden_params("sams"))
def test_golden_sams(path):
    g = np.load(path)
    assert str(g["kind"]) == "sams"
    seed = sams_seed(
        g["cam"], g["fg_cls"], g["masks"], g["levels"], float(g["alpha"]), tuple(g["image_hw"])
    )
    assert seed.dtype == np.uint8
    assert seed.shape == tuple(g["image_hw"])
    np.testing.assert_array_equal(seed, g["seed"])
