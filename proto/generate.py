"""Regenerate kvstore/_proto from proto/kvstore/v1/kvstore.proto.

    python proto/generate.py            # rewrite kvstore/_proto in place
    python proto/generate.py --out DIR  # write elsewhere (the staleness test does)

grpc_tools writes absolute imports ("from kvstore.v1 import kvstore_pb2"); they are
rewritten to point at the committed package kvstore._proto.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "kvstore" / "v1" / "kvstore.proto"
FILES = ("kvstore_pb2.py", "kvstore_pb2.pyi", "kvstore_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main([
            "protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp}", f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}", str(PROTO),
        ])
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        for name in FILES:
            text = (Path(tmp) / "kvstore" / "v1" / name).read_text()
            text = re.sub(r"^from kvstore\.v1 import", "from kvstore._proto import", text,
                          flags=re.MULTILINE)
            (out_dir / name).write_text(text)
    (out_dir / "__init__.py").write_text('"""Generated gRPC code; see proto/generate.py."""\n')


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "kvstore" / "_proto")
    generate(parser.parse_args().out)
