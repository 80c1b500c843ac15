"""The transformation report: one row per pass, printable as a table."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ptool.verify import Fidelity


def format_table(headers: list[str], rows: list[list[str]], *, align: str | None = None) -> str:
    """A plain monospace table (no dependency, so reports print anywhere).

    ``align`` is one character per column: 'l' or 'r' (default: first column left, rest right).
    """
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align)
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def _fmt_err(x: float) -> str:
    return "0" if x == 0 else ("inf" if math.isinf(x) else f"{x:.2e}")


@dataclass(frozen=True)
class Skip:
    """A site a pass looked at and left alone, with the reason (shown in the report)."""

    site: str
    reason: str


@dataclass
class PassRecord:
    """What one pass did and how the outputs moved (vs the pass's own input graph)."""

    name: str
    spec: str
    family: str
    exact: bool
    numerics: str
    seconds: float
    nodes_before: int
    nodes_after: int
    params_before: int
    params_after: int
    rewritten: int
    skipped: list[Skip] = field(default_factory=list)
    fidelity: Fidelity | None = None
    within_contract: bool = True
    notes: dict = field(default_factory=dict)
    violation: str | None = None  # how an approximate pass missed its declared bound
    round: int = 1  # the pipeline round it ran in (exact passes repeat when run to a fixpoint)

    @property
    def label(self) -> str:
        """The spec, with the round when it is not the first."""
        return self.spec if self.round == 1 else f"{self.spec} (round {self.round})"

    @classmethod
    def of(cls, pass_, result, *, seconds: float, nodes: tuple[int, int], params: tuple[int, int],
           fidelity: Fidelity | None, violation: str | None) -> PassRecord:
        """The record of one pass run (``result`` is its PassResult); used by both IR managers."""
        return cls(
            name=pass_.name, spec=pass_.spec(), family=pass_.family.value, exact=pass_.numerics.exact,
            numerics=str(pass_.numerics), seconds=seconds, nodes_before=nodes[0], nodes_after=nodes[1],
            params_before=params[0], params_after=params[1], rewritten=result.rewritten,
            skipped=list(result.skipped), fidelity=fidelity, within_contract=violation is None,
            notes=dict(result.notes), violation=violation,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skipped"] = [{"site": s.site, "reason": s.reason} for s in self.skipped]
        return d


@dataclass
class Report:
    """The report ``ptool.transform`` attaches to its result as ``.report``.

    Attributes:
        records: one :class:`PassRecord` per pass, in the order they ran.
        capture: how the model was captured (torch.export, fallback...).
        total: fidelity of the final model vs the untransformed one (None if not verified).
        verified_on: how many reference inputs the numerics were checked on.
        noise: the untransformed model's own float noise, when measured (ONNX input: ONNX
            Runtime's graph optimizations on vs off); exact passes were allowed
            ``NOISE_FACTOR`` times its max abs error.
    """

    records: list[PassRecord] = field(default_factory=list)
    capture: str = ""
    total: Fidelity | None = None
    verified_on: int = 0
    noise: Fidelity | None = None

    def __iter__(self):
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | str) -> PassRecord:
        if isinstance(key, str):
            for r in self.records:
                if r.name == key or r.spec == key:
                    return r
            raise KeyError(key)
        return self.records[key]

    def to_dict(self) -> dict:
        return {
            "capture": self.capture,
            "verified_on": self.verified_on,
            "total": asdict(self.total) if self.total else None,
            "noise": asdict(self.noise) if self.noise else None,
            "passes": [r.to_dict() for r in self.records],
        }

    def table(self) -> str:
        headers = ["pass", "kind", "seconds", "nodes", "params", "rewritten", "skipped", "max abs err", "max rel err", "cosine", "ok"]
        rows = []
        for r in self.records:
            f = r.fidelity
            rows.append([
                r.label,
                "exact" if r.exact else "approx",
                f"{r.seconds:.3f}",
                f"{r.nodes_before}->{r.nodes_after}",
                f"{r.params_before}->{r.params_after}" if r.params_before != r.params_after else str(r.params_after),
                str(r.rewritten),
                str(len(r.skipped)),
                _fmt_err(f.max_abs_error) if f else "-",
                _fmt_err(f.max_rel_error) if f else "-",
                f"{f.cosine:.6f}" if f else "-",
                "yes" if r.within_contract else "NO",
            ])
        return format_table(headers, rows, align="llrrrrrrrrl")

    def __str__(self) -> str:
        lines = [f"ptool report — captured with {self.capture}; verified on {self.verified_on} input(s)"]
        lines.append(self.table() if self.records else "(no passes)")
        latest = {r.spec: r for r in self.records}  # a later round looked at the same sites again
        skips = [(r.spec, s) for r in self.records if latest[r.spec] is r for s in r.skipped]
        if skips:
            lines.append("skipped sites:")
            lines += [f"  [{name}] {s.site}: {s.reason}" for name, s in skips[:50]]
            if len(skips) > 50:
                lines.append(f"  ... and {len(skips) - 50} more")
        for r in self.records:  # tables a pass attached (notes["tables"]: title, headers, rows, align)
            if latest[r.spec] is r:
                for t in r.notes.get("tables", ()):
                    lines.append(f"[{r.spec}] {t['title']}:")
                    lines.append(format_table(t["headers"], t["rows"], align=t.get("align")))
        if self.noise is not None:
            from ptool.verify import NOISE_FACTOR

            lines.append(f"noise floor (ONNX Runtime's optimizations on vs off): max abs {_fmt_err(self.noise.max_abs_error)}"
                         f"; exact passes may move the outputs up to {NOISE_FACTOR:g}x that")
        rounds = max((r.round for r in self.records), default=1)
        if rounds > 1:
            lines.append(f"exact passes repeated to a fixpoint: {rounds} rounds")
        if self.total is not None:
            lines.append(f"whole model vs original: {self.total}")
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle) -> None:  # IPython
        p.text(str(self))
