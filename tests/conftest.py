import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# In-process CLI runs log to a scratch folder, not the checkout's cache/logs (DVC projects built by
# tests/dvc_project.py drop this variable, so their stages log into the project, as users' do).
os.environ.setdefault("WSSS_LOG_DIR", tempfile.mkdtemp(prefix="wsss-test-logs-"))
GOLDEN_DIR = Path(os.environ.get("GOLDEN_DIR", REPO.parent / "shared" / "golden"))


def golden_files(kind: str) -> list[Path]:
    """Every conformance vector of ``kind`` (an empty directory is an error, not a pass)."""
    files = sorted(GOLDEN_DIR.glob(f"{kind}_[0-9]*.npz"))
    if not files:
        raise FileNotFoundError(f"no {kind}_*.npz golden vectors in {GOLDEN_DIR} (set GOLDEN_DIR)")
    return files


def golden_params(kind: str):
    return [pytest.param(p, id=p.stem) for p in golden_files(kind)]
