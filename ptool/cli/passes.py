"""List the registered passes as a compact table, or one pass in full.

    ptool passes            # name, family, kind, numerics, how many options, summary
    ptool passes NAME       # every option (type, default), the numerics contract, the module that holds it

Use a name with `ptool convert -p NAME` (options as `-p NAME:key=value,key2=value`).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="one pass: show every option and where it lives")
    p.add_argument("--json", action="store_true", help="print the registry (or the one pass) as JSON")


def run(args: argparse.Namespace, ui) -> int:
    from ptool.passes.pipelines import DEFAULT_PIPELINE
    from ptool.passes.registry import get_pass_class, list_passes
    from ptool.report import format_table

    rows = list_passes()
    if args.name is not None:
        cls = get_pass_class(args.name)  # PassError with "did you mean" for a wrong name
        rows = [r for r in rows if r.name == args.name]
    if args.json:
        import dataclasses
        import json

        ui.out(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return 0
    if args.name is not None:
        row = rows[0]
        ui.out(f"{row.name} ({row.family}, {'exact' if row.exact else 'approximate'}: {row.numerics})"
               f"{', needs calibration data' if row.needs_calibration else ''}")
        ui.out(f"  {row.doc}")
        ui.out(f"  module: {cls.__module__}.{cls.__qualname__}")
        options = [[key, value] for key, value in row.options.items()]
        if options:
            ui.out("")
            ui.out(format_table(["option", "type (default)"], options, align="ll"))
        ui.out("")
        ui.out(f"use: ptool convert -p {row.name}:key=value,key2=value")
        return 0
    table = [[r.name, r.family, "exact" if r.exact else "approximate", r.numerics, str(len(r.options)), r.doc]
             for r in rows]
    ui.out(format_table(["pass", "family", "kind", "numerics", "options", "summary"], table, align="llllll"))
    ui.out("")
    ui.out(f"default pipeline (convert / bench / demo without -p): {' '.join(DEFAULT_PIPELINE)}")
    ui.out("every option, its type and default: ptool passes NAME")
    return 0
