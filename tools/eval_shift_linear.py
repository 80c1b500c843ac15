"""How close does ``shift-linear`` keep all-MiniLM-L6-v2 (real weights)? Prints a markdown table.

The sentence embedder (``ptool.default_model.load_embedder``: MiniLM + mean pooling + L2 norm) is
traced on 8 sentences x 64 tokens; each ``shift-linear`` mode is applied to the feed-forward Linears
only (``sites=mlp``: intermediate.dense / output.dense of the 6 layers) and, for reference, to every
Linear (``sites=all``). Metric: the mean cosine between the float and the shifted sentence embeddings
over the 64 held-out sentences shipped with ptool (``sample_sentences``, 8 batches of 8, padded).
Also printed, per forward of one batch: the multiply-accumulates the rewritten layers turn into
shift-adds, and the multiplications that remain in their epilogue (row quantization and rescale).

    .venv/bin/python tools/eval_shift_linear.py [--modes shift,shift2,ternary,binary] [--sites mlp,all] [--ort]

About a minute on 2 busy cores (``--ort`` adds an ONNX Runtime check of each configuration).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ptool  # noqa: E402
from _minilm import heldout_batches, log, mean_cosine  # noqa: E402

SEQ, BATCH = 64, 8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="shift,shift2,ternary,binary")
    p.add_argument("--sites", default="mlp,all")
    p.add_argument("--ort", action="store_true", help="also run each model in ONNX Runtime and compare with torch")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from ptool.default_model import load_embedder

    model = load_embedder()
    batches = heldout_batches(SEQ, BATCH)
    example = batches[0]
    rows = []
    for sites in a.sites.split(","):
        for mode in a.modes.split(","):
            start = time.perf_counter()
            m2 = ptool.transform(model, [f"shift-linear:mode={mode},sites={sites}"], example)
            notes = m2.report[0].notes
            row = {"sites": sites, "mode": mode, "layers": m2.report[0].rewritten,
                   "cosine": mean_cosine(model, m2, batches),
                   "macs": notes["macs_replaced"], "mults_left": notes["multiplies_added"],
                   "weight_error": sum(notes["weight_error"].values()) / max(1, len(notes["weight_error"]))}
            if a.ort:
                run = ptool.compile(m2, backend="onnxruntime", example_inputs=example)
                with torch.no_grad():
                    row["ort_max_abs"] = max(float((run(*b) - m2(*b)).abs().max()) for b in batches)
            row["seconds"] = time.perf_counter() - start
            log(str(row))
            rows.append(row)
    head = ["sites", "mode", "layers", "mean weight rel. MSE", "embedding cosine vs float",
            "MACs -> shift-adds / forward", "multiplies left"] + (["ORT vs torch max abs"] if a.ort else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["sites"], r["mode"], str(r["layers"]), f"{r['weight_error']:.4f}", f"{r['cosine']:.5f}",
                 f"{r['macs'] / 1e6:.1f} M", f"{r['mults_left'] / 1e6:.2f} M"]
        if a.ort:
            cells.append(f"{r['ort_max_abs']:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    print(f"all-MiniLM-L6-v2, batch {BATCH} x {SEQ} tokens, {len(batches) * BATCH} held-out sentences\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
