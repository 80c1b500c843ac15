"""How many multiplications do the shift-add passes remove per model? Writes BENCHMARKS.md ``shiftadd_counts``.

For each model (batch 1; text at 128 tokens, ViT at 224x224) the matmul-class multiply-accumulates
of the captured graph (``ptool.ir.flops``) are counted before and after each shift-add pipeline.
What the passes replace (the shift-linear matmuls, the QK^T and AV products of binary attention)
becomes shifts and additions and is no longer counted; what they add (hash projections of q and k)
is counted (torch's FlopCounterMode on a forward, plus the graph's remaining SDPA products); the per-row quantization and rescale multiplies of ``shift-linear`` are taken from the
pass notes and added. Models: all-MiniLM-L6-v2 (real weights), BERT-base and ViT-base (transformers
default configs, random weights: counts do not depend on the weights).

    .venv/bin/python tools/count_shiftadd.py
"""

from __future__ import annotations

import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ptool  # noqa: E402
from ptool.ir.flops import estimate_flops  # noqa: E402
from tools._sections import write_section  # noqa: E402

SEQ = 128
PIPELINES = {
    "shift-linear (MLPs)": ["shift-linear:sites=mlp"],
    "shift-linear (all Linears)": ["shift-linear"],
    "binary-attention": ["binary-attention"],
    "shift-linear + binary-attention": ["shift-linear", "binary-attention"],
}


def models() -> dict[str, tuple[torch.nn.Module, tuple]]:
    import transformers

    from ptool.default_model import encode, load_embedder

    ids, mask = encode(["a sentence to count the work of a transformer on"], SEQ)
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(), add_pooling_layer=False).eval()
    vit = transformers.ViTModel(transformers.ViTConfig(), add_pooling_layer=False).eval()
    return {
        "all-MiniLM-L6-v2": (load_embedder(), (ids, mask)),
        "BERT-base": (bert, (ids, mask)),
        "ViT-base/16": (vit, (torch.randn(1, 3, 224, 224),)),
    }


def graph_macs(module) -> int:
    """Multiply-accumulates of the captured graph's matmul-class ops (SDPA included)."""
    return estimate_flops(module.graph_module).total // 2


def run_macs(module, example: tuple) -> int:
    """Multiply-accumulates a forward really runs (torch's FlopCounterMode, which also sees the hash
    projections inside binary-attention's kernel modules), plus the graph's SDPA products, which the
    counter does not see."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*example)
    by_op = estimate_flops(module.graph_module).by_op
    sdpa = sum(v for k, v in by_op.items() if "scaled_dot_product" in str(k))
    return (counter.get_total_flops() + sdpa) // 2


def epilogue_multiplies(m2) -> int:
    return sum(int(r.notes.get("multiplies_added", 0)) for r in m2.report)


def main() -> None:
    torch.set_num_threads(2)
    rows = []
    for name, (model, example) in models().items():
        base = graph_macs(ptool.transform(model, [], example))
        for label, passes in PIPELINES.items():
            start = time.perf_counter()
            m2 = ptool.transform(model, passes, example)
            after = run_macs(m2, example) + epilogue_multiplies(m2)
            rows.append({"model": name, "pipeline": label, "macs_before": base, "mults_after": after,
                         "removed": base - after, "removed_pct": 100 * (base - after) / base})
            print(rows[-1], f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    head = "| model | pipeline | multiplications before | after | removed |\n|---|---|---:|---:|---:|"
    lines = [head] + [
        f"| {r['model']} | {r['pipeline']} | {r['macs_before'] / 1e9:.3f} G | {r['mults_after'] / 1e9:.3f} G | "
        f"{r['removed'] / 1e9:.3f} G ({r['removed_pct']:.1f}%) |" for r in rows
    ]
    body = (
        "## Shift-add: multiplications removed per model\n\n"
        "`tools/count_shiftadd.py`. Matmul-class multiplications of one forward (batch 1; 128 tokens, ViT "
        "224x224) before and after each pipeline, from the shapes of the captured graphs and a counted forward. Replaced products "
        "become shifts and additions (`shift-linear`) or additions (`binary-attention`); \"after\" counts "
        "what remains, including the hash projections binary attention adds and the per-row quantization "
        "and rescale multiplies of `shift-linear`.\n\n" + "\n".join(lines)
    )
    print(write_section("shiftadd_counts", body, rows))


if __name__ == "__main__":
    main()
