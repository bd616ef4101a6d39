"""Access to the committed diffusers reference cases (tests/fixtures/references)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
REFERENCES = os.path.join(FIXTURES, "references")


def cases(kind: str) -> list[dict[str, Any]]:
    """All reference cases of one kind (as written by tools/reference/make_tiny_checkpoints.py)."""
    with open(os.path.join(REFERENCES, "cases.json"), encoding="utf-8") as f:
        found = [c for c in json.load(f) if c["kind"] == kind]
    assert found, f"no reference cases of kind {kind!r}"
    return found


def arrays(case: dict[str, Any]) -> dict[str, np.ndarray]:
    with np.load(os.path.join(REFERENCES, case["file"]), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def fixture_path(name: str) -> str:
    return os.path.join(FIXTURES, name)
