"""Fidelity of ``binary-attention`` on all-MiniLM-L6-v2 (real weights): every layer's attention on binary codes.

Protocol (as ``tools/eval_attention.py``): the sentence embedder (MiniLM + mean pooling + L2 norm)
at 128 tokens; calibration = packed 128-token rows of the Python reference manual bundled with
CPython; held-out = the 64 sentences shipped with ptool, one per row, padded to 128 tokens (padding
masks matter), which the conversion never sees. The figure is the mean cosine between the
converted and the original model's embeddings.

Variants: ``hash=random`` (SimHash, no data), ``hash=learned`` (asymmetric linear hashes distilled
by attention transfer, ``--transfer-steps``; with ``--distill-steps`` also end-to-end) and
``hash=ecoformer`` (EcoFormer's kernelized hash, KSH fit + the same transfer), at 16, 32, 64 bits.

    .venv/bin/python tools/eval_binary_attention.py [--bits 16,32,64] [--hashes random,learned]
        [--transfer-steps 200] [--distill-steps 0] [--calibration-batches 8]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ptool  # noqa: E402
from _minilm import calibration_batches, heldout_batches, log, mean_cosine  # noqa: E402
from ptool.default_model import load_embedder  # noqa: E402

SEQ, BATCH = 128, 8


def data(calibration: int):
    return calibration_batches(SEQ, BATCH, calibration), heldout_batches(SEQ, BATCH)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bits", default="16,32,64")
    p.add_argument("--hashes", default="random,learned,ecoformer")
    p.add_argument("--transfer-steps", type=int, default=200)
    p.add_argument("--distill-steps", type=int, default=0)
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--json", help="also write the rows to this file")
    a = p.parse_args()
    torch.manual_seed(0)
    calib, heldout = data(a.calibration_batches)
    reference = load_embedder()
    rows = []
    for hash_ in a.hashes.split(","):
        for bits in (int(b) for b in a.bits.split(",")):
            spec = f"binary-attention:hash={hash_},bits={bits}"
            if hash_ != "random":
                spec += f",transfer_steps={a.transfer_steps},distill_steps={a.distill_steps}"
            start = time.perf_counter()
            model = ptool.transform(load_embedder(), [spec], calib[0],
                                    calibration=None if hash_ == "random" else calib)
            record = model.report[0]
            row = {"spec": spec, "sites": record.rewritten, "cosine": mean_cosine(reference, model, heldout),
                   "seconds": time.perf_counter() - start}
            rows.append(row)
            log(f"{spec}: sites={row['sites']} cosine={row['cosine']:.4f} ({row['seconds']:.0f} s)")
    print("| hash | bits | sites | held-out embedding cosine | convert s |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        opts = dict(kv.split("=") for kv in row["spec"].split(":", 1)[1].split(","))
        print(f"| {opts['hash']} | {opts['bits']} | {row['sites']} | {row['cosine']:.4f} | {row['seconds']:.0f} |")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"rows": rows, "args": vars(a)}, indent=1))


if __name__ == "__main__":
    main()
