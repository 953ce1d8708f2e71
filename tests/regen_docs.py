"""Rewrite the generated parts of docs/ from the code: `python3 tests/regen_docs.py`."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nspawn_runner import settings  # noqa: E402

doc = ROOT / "docs" / "configuration.md"
text = doc.read_text()
start = text.index("-->\n", text.index("<!-- BEGIN SETTINGS TABLE")) + 4
end = text.index("<!-- END SETTINGS TABLE")
doc.write_text(text[:start] + settings.reference_markdown() + text[end:])

(ROOT / "examples" / "nspawn-runner.toml").write_text(settings.template())
