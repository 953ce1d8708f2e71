"""Shared by the unit and integration tests: make tests/ importable (gitlab_emulator, testbed)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
