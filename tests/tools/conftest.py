"""The research tools (tools/) are scripts beside the package, not part of it: their tests import
them from that folder."""

import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))
