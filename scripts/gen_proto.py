"""Regenerate the Python protobuf modules from proto/tether/v1/*.proto.

The output is checked in (src/tether/wire/_pb/) so that installing tether
needs only the protobuf runtime; tests/wire/test_generated.py re-runs this
generator into a temporary directory and fails when the checked-in files
differ, so the .proto and the Python never drift apart. The generator
versions are pinned by constraints.txt (grpcio-tools, mypy-protobuf), which
makes the output reproducible.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "src" / "tether" / "wire" / "_pb"


def _plugin() -> str:
    """The protoc-gen-mypy executable installed beside this interpreter."""
    found = shutil.which("protoc-gen-mypy", path=str(Path(sys.executable).parent))
    found = found or shutil.which("protoc-gen-mypy")
    if found is None:
        raise SystemExit("protoc-gen-mypy not found: pip install mypy-protobuf")
    return found


def generate(out: Path) -> list[Path]:
    """Run protoc on every .proto under proto/tether/v1 and copy the results to `out`."""
    from grpc_tools import protoc  # test extra; imported lazily

    protos = sorted((PROTO_ROOT / "tether" / "v1").glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            # mypy-protobuf's stubs (enum ValueTypes, oneof literals) for mypy --strict
            f"--plugin=protoc-gen-mypy={_plugin()}",
            f"--mypy_out={tmp}",
            *[str(p.relative_to(PROTO_ROOT)) for p in protos],
        ]
        # protoc resolves the relative .proto paths against the include dirs
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out.mkdir(parents=True, exist_ok=True)
        for produced in sorted((Path(tmp) / "tether" / "v1").iterdir()):
            target = out / produced.name
            shutil.copyfile(produced, target)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
