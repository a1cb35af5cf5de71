"""Shared test setup: repo root on sys.path, golden-data location, fast CPU defaults."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

REFERENCE = os.environ.get("RESEARCH_REFERENCE", os.path.join(ROOT, "..", "shared", "reference"))
