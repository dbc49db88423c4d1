import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("GOLDEN_DIR", REPO.parent / "shared" / "golden"))


def golden_files(kind: str) -> list[Path]:
    """Every conformance vector of ``kind`` (an empty directory is an error, not a pass)."""
    files = sorted(GOLDEN_DIR.glob(f"{kind}_[0-9]*.npz"))
    if not files:
        raise FileNotFoundError(f"no {kind}_*.npz golden vectors in {GOLDEN_DIR} (set GOLDEN_DIR)")
    return files


def golden_params(kind: str):
    return [pytest.param(p, id=p.stem) for p in golden_files(kind)]


@pytest.fixture(scope="session", autouse=True)
def stage_logs_in_scratch(tmp_path_factory):
    """In-process CLI runs log to pytest's scratch folder, not the checkout's cache/logs (DVC
    projects built by tests/dvc_project.py drop the variable: their stages log into the project)."""
    if "WSSS_LOG_DIR" not in os.environ:
        os.environ["WSSS_LOG_DIR"] = str(tmp_path_factory.mktemp("stage-logs"))
