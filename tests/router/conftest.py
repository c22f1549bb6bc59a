"""Real ``kvasir serve`` replicas and ``kvasir router`` subprocesses for the router tests."""

from __future__ import annotations

import sys
from pathlib import Path

# server_utils (start_server, ServerProc) lives beside the server tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
