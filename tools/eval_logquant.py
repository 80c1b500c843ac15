"""Log vs uniform quantization of post-softmax and post-GELU activations on the digits ViT.

Writes the "Log quantizers" section of ``BENCHMARKS.md`` (key ``log_quant``).

Protocol: the ViT trained on scikit-learn's digits (``tests/models/digits_vit.py``: 2 layers,
17 tokens, 97.2% test accuracy), switched to eager attention so the softmax is in the graph.
``log-quant`` is calibrated on the first ``--calib`` training batches of 32 images (AdaLog uses
32-image batches) and judged on the 540 held-out test images, which calibration never sees:

- layer output: for every site, the site's quantizer (as the pass inserted it) applied to the
  float model's own activations, and the layer output it feeds compared with the float one:
  ``A @ V`` for softmax sites, ``fc2`` for GELU sites. Cosine and SQNR of that output, and SQNR
  of the activation itself; the mean over the model's two sites.
- model: cosine of the logits against the float model's, and top-1 accuracy.

Only the named activations are quantized (weights, V and every other activation stay float), so
the table isolates the quantizer.

    .venv/bin/python tools/eval_logquant.py [--calib 4]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ptool  # noqa: E402
from ptool.passes.quant.logquant import LogQuant, SiteKind, site_objectives  # noqa: E402
from _sections import write_section  # noqa: E402  (tools/ is on sys.path when run as a script)
from tests.models import digits_vit as dv  # noqa: E402

CONFIGS = [("softmax", 3), ("softmax", 4), ("gelu", 4)]
BASES = ["uniform", "log2", "sqrt2", "adaptive"]
CALIB_BATCH = 32


def _logits(model, x: torch.Tensor, batch: int = 270) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]).logits for i in range(0, len(x), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=4, help="calibration batches of 32 training images")
    parser.add_argument("--no-write", action="store_true", help="print the table instead of updating BENCHMARKS.md")
    args = parser.parse_args()

    start = time.perf_counter()
    with dv.single_thread():
        trained = dv.digits_vit()
        model = trained.model
        model.set_attn_implementation("eager")
        data = trained.data
        calibration = data.train_batches(CALIB_BATCH, n=args.calib)
        test_calls = [((data.x_test[i:i + 270],), {}) for i in range(0, len(data.x_test), 270)]
        dynamic = {"pixel_values": {0: torch.export.Dim("batch", min=1)}}
        float_gm = ptool.transform(model, [], trained.example_inputs, dynamic_shapes=dynamic).graph_module
        ref_logits = _logits(model, data.x_test)
        float_acc = dv.accuracy(model, data.x_test, data.y_test)

        rows = []
        for target, bits in CONFIGS:
            for base in BASES:
                p = LogQuant(bits=bits, base=base, targets=target)
                m2 = ptool.transform(model, [p], trained.example_inputs, calibration=calibration,
                                     dynamic_shapes=dynamic)
                rec = m2.report["log-quant"]
                shift = p.gelu_shift if base != "uniform" else 0.0
                objectives = site_objectives(float_gm, test_calls, [SiteKind(target)], gelu_shift=shift)
                layer = []
                for label, note in rec.notes["sites"].items():
                    quantizer = m2.graph_module.get_submodule(note["module"])
                    with torch.no_grad():
                        layer.append(objectives[label].report(quantizer))
                logits = _logits(m2, data.x_test)
                cos = float(torch.nn.functional.cosine_similarity(logits.flatten(), ref_logits.flatten(), dim=0))
                acc = float((logits.argmax(-1) == data.y_test).float().mean())
                chosen = ", ".join(n["quantizer"] for n in rec.notes["sites"].values())
                rows.append((target, bits, base, chosen,
                             statistics.mean(r["output_cosine"] for r in layer),
                             statistics.mean(r["output_sqnr_db"] for r in layer),
                             statistics.mean(r["sqnr_db"] for r in layer), cos, acc))
                print(f"  {target} {bits}-bit {base}: done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    lines = ["## Log quantizers for post-softmax / post-GELU activations (`tools/eval_logquant.py`)", "",
             f"Digits ViT (eager attention, 2 layers, 17 tokens), calibrated on {args.calib}x{CALIB_BATCH} training "
             f"images, judged on the {len(data.x_test)} test images. Float top-1: {float_acc:.4f}. Only the named "
             "activations are quantized. Layer figures: mean over the two sites; 'cosine loss' = 1 - layer-output "
             "cosine.", "",
             "| sites | bits | quantizer | chosen base (layer 0, 1) | layer-output cosine | cosine loss "
             "| layer-output SQNR (dB) | activation SQNR (dB) | logits cosine | top-1 |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for target, bits, base, chosen, lcos, lsqnr, asqnr, cos, acc in rows:
        lines.append(f"| {target} | {bits} | {base} | {chosen} | {lcos:.4f} | {1 - lcos:.4f} | {lsqnr:.1f} "
                     f"| {asqnr:.1f} | {cos:.4f} | {acc:.4f} |")
    md = "\n".join(lines)
    if args.no_write:
        print(md)
    else:
        print(write_section("log_quant", md, {"rows": [list(r) for r in rows], "calib": args.calib}))
    print(f"\n({time.perf_counter() - start:.0f} s on this machine, training included)", file=sys.stderr)


if __name__ == "__main__":
    main()
