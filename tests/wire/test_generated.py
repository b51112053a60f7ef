"""The checked-in protobuf modules are exactly what the .proto generates.

Editing proto/tether/v1/tether.proto without re-running scripts/gen_proto.py
would leave the Python (and the stubs mypy checks against) describing an older
protocol; this test re-runs the generator and fails on any difference.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_proto.py"
CHECKED_IN = ROOT / "src" / "tether" / "wire" / "_pb"


def _load_generator() -> ModuleType:
    # scripts/ is not a package: load the file itself, as `make proto` runs it.
    spec = importlib.util.spec_from_file_location("_tether_gen_proto", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pinned_grpcio_tools() -> str | None:
    text = (ROOT / "constraints.txt").read_text()
    m = re.search(r"^grpcio-tools==(\S+)", text, re.MULTILINE)
    return m.group(1) if m else None


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("pb")
    written = _load_generator().generate(out)
    # generate() reports what it wrote; it must all be inside `out`.
    assert written, "the generator produced no files"
    assert all(p.parent == out for p in written)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _hint() -> str:
    installed = importlib.metadata.version("grpcio-tools")
    pinned = _pinned_grpcio_tools()
    return (
        "run `python scripts/gen_proto.py` and commit the result "
        f"(grpcio-tools installed: {installed}, pinned in constraints.txt: {pinned}; "
        "a different generator version also changes the output)"
    )


def test_generator_produces_the_expected_modules(generated: dict[str, bytes]) -> None:
    assert set(generated) == {"tether_pb2.py", "tether_pb2.pyi"}


def test_no_stale_generated_files_checked_in(generated: dict[str, bytes]) -> None:
    # A module left over from a deleted or renamed .proto would still import.
    checked_in = {p.name for p in CHECKED_IN.iterdir() if p.is_file() and p.name != "__init__.py"}
    assert checked_in == set(generated), _hint()


@pytest.mark.parametrize("name", ["tether_pb2.py", "tether_pb2.pyi"])
def test_checked_in_module_matches_the_proto(generated: dict[str, bytes], name: str) -> None:
    current = (CHECKED_IN / name).read_bytes()
    # Compare bytes, but keep pytest from printing two 30 KB blobs on failure.
    assert current == generated[name], f"src/tether/wire/_pb/{name} is out of date: " + _hint()


def test_a_proto_edit_is_detected(tmp_path: Path) -> None:
    # Guard the guard: generate from an edited copy of the .proto and check the
    # output differs, so the comparison above cannot pass vacuously.
    generator = _load_generator()
    proto_root = tmp_path / "proto"
    source = ROOT / "proto" / "tether" / "v1" / "tether.proto"
    edited = proto_root / "tether" / "v1" / "tether.proto"
    edited.parent.mkdir(parents=True)
    edited.write_text(source.read_text() + "\nmessage AddedByTest {\n  string x = 1;\n}\n")
    generator.PROTO_ROOT = proto_root  # generate() reads the module global
    out = tmp_path / "out"
    generator.generate(out)
    for name in ("tether_pb2.py", "tether_pb2.pyi"):
        assert (out / name).read_bytes() != (CHECKED_IN / name).read_bytes(), name
