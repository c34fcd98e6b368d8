"""Generate the Python gRPC stubs under gen/ from protos/ (the only way they are made).

Run `make protos`; CI runs `make check-stubs`, which fails when the committed stubs differ
from what this script produces.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
OUT = ROOT / "gen"


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(
        ["grpc_tools.protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={OUT}",
         f"--pyi_out={OUT}", f"--grpc_python_out={OUT}", *files]
    )
    if rc != 0:
        return rc
    # Regular packages, so setuptools and mypy see them.
    for d in [OUT / "tessera", *sorted(p for p in (OUT / "tessera").rglob("*") if p.is_dir())]:
        (d / "__init__.py").touch()
    print(f"generated stubs for {len(files)} proto files into {OUT.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
