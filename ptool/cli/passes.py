"""List the registered passes: name, family, exact/approximate, numerics contract, options, summary.

Use a name with `ptool convert -p NAME` (options as `-p NAME:key=value,key2=value`).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the registry as JSON")


def run(args: argparse.Namespace, ui) -> int:
    from ptool.passes.pipelines import DEFAULT_PIPELINE
    from ptool.passes.registry import list_passes
    from ptool.report import format_table

    rows = list_passes()
    if args.json:
        import dataclasses
        import json

        ui.out(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return 0
    table = [
        [r.name, r.family, "exact" if r.exact else "approximate", r.numerics,
         ", ".join(f"{k}: {v}" for k, v in r.options.items()) or "-", r.doc]
        for r in rows
    ]
    ui.out(format_table(["pass", "family", "kind", "numerics", "options", "summary"], table, align="llllll"))
    ui.out("")
    ui.out(f"default pipeline (convert / bench / demo without -p): {' '.join(DEFAULT_PIPELINE)}")
    return 0
