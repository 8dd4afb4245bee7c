"""`import kvstore.client` must not load torch, triton, redis or the daemon's parts."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("torch", "triton", "redis", "kvstore.server", "kvstore.tiers", "kvstore.engine")


def test_import_client_loads_no_heavy_or_server_modules():
    code = (
        "import json, sys\n"
        "import kvstore.client\n"
        "from kvstore import Client, AsyncClient\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    loaded = json.loads(out.stdout)
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert bad == []
