"""The audit file writer: lines batched into few writes, none lost."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tether.gateway import audit
from tether.gateway.audit import FLUSH_DELAY, FLUSH_LINES, AuditFile


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_lines_of_one_burst_share_a_write(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    f = AuditFile(str(path))

    async def burst() -> tuple[list[str], list[str]]:
        for i in range(3):
            f.write(audit.encode({"event": "test", "n": i}))
        before = _lines(path)
        await asyncio.sleep(FLUSH_DELAY * 5)
        return before, _lines(path)

    before, after = asyncio.run(burst())
    f.close()
    assert before == []  # waiting for the batch
    assert [json.loads(line)["n"] for line in after] == [0, 1, 2]


def test_a_full_batch_is_written_at_once_and_close_writes_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    f = AuditFile(str(path))

    async def flood() -> int:
        for i in range(FLUSH_LINES + 5):
            f.write(f'{{"n":{i}}}')
        return len(_lines(path))

    written = asyncio.run(flood())
    assert written == FLUSH_LINES  # the rest waits for its timer or for close()
    f.close()
    assert [json.loads(line)["n"] for line in _lines(path)] == list(range(FLUSH_LINES + 5))


def test_without_a_loop_a_line_is_written_at_once(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    f = AuditFile(str(path))
    f.write('{"n":1}')
    assert _lines(path) == ['{"n":1}']
    f.close()


def test_encode_is_compact_ascii_json() -> None:
    line = audit.encode({"app": "é", "n": [1, 2], "x": Path("/p")})
    assert line == '{"app":"\\u00e9","n":[1,2],"x":"/p"}'
