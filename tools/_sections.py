"""Read and write one marked section of BENCHMARKS.md and one key of BENCHMARKS.json (the section tools share)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import pathlib
from typing import Callable, Iterator

ROOT = pathlib.Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Hold an exclusive lock on the two files while one tool reads and rewrites them, so tools
    (or shards of one tool) running side by side never lose each other's sections."""
    with open(ROOT / ".benchmarks.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_section(key: str) -> dict:
    """``BENCHMARKS.json[key]`` as the last run of its tool wrote it (empty if none)."""
    json_path = ROOT / "BENCHMARKS.json"
    return json.loads(json_path.read_text()).get(key, {}) if json_path.exists() else {}


def write_section(key: str, markdown_body: str, data: object) -> str:
    """Replace (or append) the ``<!-- key:start -->`` .. ``<!-- key:end -->`` section and ``data[key]``."""
    with _locked():
        return _write_section(key, markdown_body, data)


def update_section(key: str, render: Callable[[dict], tuple[str, object]]) -> str:
    """Read ``data[key]``, let ``render`` turn it into (markdown, new data) and write both, under one
    lock: for tools that merge their rows into what a concurrent run just wrote."""
    with _locked():
        return _write_section(key, *render(read_section(key)))


def _write_section(key: str, markdown_body: str, data: object) -> str:
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    md_path, json_path = ROOT / "BENCHMARKS.md", ROOT / "BENCHMARKS.json"
    text = md_path.read_text() if md_path.exists() else "# ptool benchmarks\n"
    section = f"{start}\n{markdown_body.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    md_path.write_text(text)
    blob = json.loads(json_path.read_text()) if json_path.exists() else {}
    blob[key] = data
    json_path.write_text(json.dumps(blob, indent=2, default=str))
    return section


def write_head(markdown_head: str, data: dict) -> None:
    """Replace what precedes the first marked section of BENCHMARKS.md (``tools/bench.py``'s part)
    and ``data``'s keys of BENCHMARKS.json; every marked section and other key is kept."""
    md_path, json_path = ROOT / "BENCHMARKS.md", ROOT / "BENCHMARKS.json"
    text = md_path.read_text() if md_path.exists() else ""
    first = text.find("<!-- ")
    sections = text[first:] if first >= 0 else ""
    md_path.write_text(markdown_head.rstrip("\n") + "\n" + ("\n" + sections if sections else ""))
    blob = json.loads(json_path.read_text()) if json_path.exists() else {}
    blob.update(data)
    json_path.write_text(json.dumps(blob, indent=2, default=str) + "\n")
