"""docs/configuration.md is the typed config, regenerated: it cannot drift from the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_current():
    generated = subprocess.run([sys.executable, "-m", "moe_rl.config.run"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout
    doc = (ROOT / "docs/configuration.md").read_text()
    table = doc[doc.index("| key |"):]
    assert table.strip() == generated[generated.index("| key |"):].strip(), (
        "docs/configuration.md is stale: regenerate it with `python -m moe_rl.config.run` (see its header)")
