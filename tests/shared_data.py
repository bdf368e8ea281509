"""Where the real public data sets are (../shared/data, see its README): ``GLMWB_SHARED_DATA`` when set, else
the first ``shared/data`` folder beside the checkout or beside one of its parent folders (a worktree under
``wt/`` finds the one its main checkout has). Tests that need it skip when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _find() -> Path:
    if os.environ.get("GLMWB_SHARED_DATA"):
        return Path(os.environ["GLMWB_SHARED_DATA"])
    for parent in REPO.parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return REPO.parent / "shared" / "data"  # absent: the tests that need it skip


SHARED_DATA = _find()
