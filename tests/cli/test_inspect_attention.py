"""``ptool inspect`` on attention in every form: the sites, and the softmaxes no attention pass converts."""

from __future__ import annotations

import json

import pytest

from ptool.cli import main

MODEL = "tests.passes.attention.attention_forms:all_forms"


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _section(out: str, title: str) -> list[str]:
    """The data rows of the table under the line starting with ``title``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows = []
    for line in lines[start + 3:]:  # title, header, dashes
        if not line.strip():
            break
        rows.append(line)
    return rows


def test_inspect_lists_sites_and_the_softmaxes_it_does_not_convert(capsys):
    code, out, err = _run(capsys, "inspect", MODEL)
    assert code == 0, err
    sites = _section(out, "attention sites")
    assert [row.split()[:2] for row in sites] == [["0", "swin.blocks.0.attn"], ["1", "swin.blocks.1.attn"],
                                                  ["2", "maxvit"]]
    assert "relative_position_bias_table, attn_mask" in sites[1]
    assert "eager (einsum, 5-D)" in sites[2]
    skipped = _section(out, "softmax attention, not converted")
    assert [row.split()[:2] for row in skipped] == [["softmax_3", "cait"], ["softmax_4", "xcit"],
                                                    ["softmax_5", "coat"]]
    assert "talking heads: cait.proj_l mixes the heads' scores before the softmax" in skipped[0]
    assert "channel attention (XCiT cross-covariance)" in skipped[1]
    assert "factorized attention (CoaT)" in skipped[2]


def test_inspect_json_has_the_not_converted_softmaxes(capsys):
    code, out, _ = _run(capsys, "inspect", MODEL, "--json")
    assert code == 0
    data = json.loads(out)
    assert [(a["module"], a.get("bias")) for a in data["attention_sites"]] == [
        ("swin.blocks.0.attn", ["relative_position_bias_table"]),
        ("swin.blocks.1.attn", ["relative_position_bias_table", "attn_mask"]), ("maxvit", None)]
    assert [(a["spelling"], a["rank"]) for a in data["attention_sites"]] == [("matmul", 4), ("matmul", 4),
                                                                             ("einsum", 5)]
    assert [(a["softmax"], a["module"], a["reason"].split(":")[0].split(" (")[0])
            for a in data["attention_not_converted"]] == [
        ("softmax_3", "cait", "talking heads"), ("softmax_4", "xcit", "channel attention"),
        ("softmax_5", "coat", "factorized attention")]
