"""Every attention variant on a trained vision model: test accuracy of the digits ViT, before and after conversion.

Writes the "Attention on a trained ViT" section of ``BENCHMARKS.md`` (key ``attention_vit``).

Protocol: the ViT trained on scikit-learn's digits (``tests/models/digits_vit.py``: patch 2 on
8x8 images, a 4x4 grid of patches + CLS = 17 tokens, 2 layers, 4 heads; trained in-process,
seeded). Accuracy on the first 512 test images (never used for conversion), batches of 64.
Conversion data: 8 batches of 64 training images. "before" = the swap alone
(``transfer_steps=0``); "after" = attention transfer (kernels with parameters) + LoRA
distillation, as ``tools/eval_attention.py`` does on text. This table is where ``axial`` (rows and
columns of the patch grid) is measured: it has no grid to work on in a text model.

    .venv/bin/python tools/eval_attention_vit.py [--only axial,hedgehog] [--steps 100]

``--only`` measures the named rows and keeps the section's other rows (when they were measured
with the same ``--steps``); without it the section is rewritten with every row.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ptool  # noqa: E402
from _sections import update_section  # noqa: E402
from eval_attention import LORA, TRAINING_NOTES, VARIANTS  # noqa: E402
from tests.models.digits_vit import accuracy, digits_vit, single_thread  # noqa: E402

BATCH, TEST_IMAGES, CALIBRATION_BATCHES = 64, 512, 8

#: name -> (pass spec, kernel has parameters): the text table's variants, windows sized for 17 tokens, and axial
VISION_VARIANTS = {
    **{name: v for name, v in VARIANTS.items() if "32" not in name},
    "hedgehog + window 5 (LoLCATs hybrid)": ("linear-attention:feature_map=hedgehog,window=5", True),
    "window 5": ("sparse-attention:method=window,window=5", False),
    "block-diag 4": ("sparse-attention:method=block-diag,block_size=4", False),
    "axial (patch rows and columns)": ("sparse-attention:method=axial", False),
}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="", help="comma-separated variant names (prefix match)")
    p.add_argument("--steps", type=int, default=100, help="transfer steps, and as many LoRA distillation steps")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    wanted = [w for w in a.only.split(",") if w]
    rows = {}
    with single_thread():
        d = digits_vit(0)
        x, y = d.data.x_test[:TEST_IMAGES], d.data.y_test[:TEST_IMAGES]
        calib = d.data.train_batches(BATCH, CALIBRATION_BATCHES)
        original = accuracy(d.model, x, y, BATCH)
        log(f"original: {original:.4f}")
        for name, (spec, trainable) in VISION_VARIANTS.items():
            if wanted and not any(name.startswith(w) for w in wanted):
                continue
            row = {"spec": spec}
            for stage, options in (("before", "transfer_steps=0"),
                                   ("after", f"transfer_steps={a.steps if trainable else 0},distill_steps={a.steps},"
                                             + LORA)):
                start = time.perf_counter()
                full = spec + ("," if ":" in spec else ":") + options
                try:
                    model = ptool.transform(digits_vit(0).model, [full], calib[0], calibration=calib)
                except Exception as e:  # the cell says it failed
                    row[stage] = f"failed: {str(e)[:160]}"
                    log(f"{name} {stage}: {row[stage]}")
                    continue
                notes = model.report[0].notes
                row[stage] = {"accuracy": accuracy(model, x, y, BATCH), "seconds": time.perf_counter() - start,
                              "rewritten": model.report[0].rewritten,
                              **{k: notes[k] for k in TRAINING_NOTES if k in notes}}
                log(f"{name} {stage}: {row[stage]}")
            rows[name] = row
    if a.no_write:
        print(markdown(rows, original, a.steps))
        return

    def render(earlier: dict) -> tuple[str, dict]:
        # --only: the rows not run now are kept when they were measured with the same steps
        kept = earlier.get("rows", {}) if wanted and earlier.get("steps") == a.steps else {}
        merged = {**kept, **rows}
        merged = {k: merged[k] for k in VISION_VARIANTS if k in merged}
        return markdown(merged, original, a.steps), {"original": original, "steps": a.steps, "rows": merged}

    print(update_section("attention_vit", render))


def markdown(rows: dict, original: float, steps: int) -> str:
    def cell(r) -> str:
        if not isinstance(r, dict):
            return "failed"
        return f"{r['accuracy']:.4f}" + (" (reverted)" if "distill_reverted" in r else "")

    lines = ["## Attention on a trained ViT (`tools/eval_attention_vit.py`)", "",
             "Digits ViT (scikit-learn's 8x8 digits, patch 2: a 4x4 grid + CLS = 17 tokens, 2 layers, 4 heads), "
             f"top-1 accuracy on {TEST_IMAGES} held-out test images; original model **{original:.4f}**. Conversion "
             f"data: {CALIBRATION_BATCHES} batches of {BATCH} training images. before = the swap alone; after = "
             f"{steps} attention-transfer steps (kernels with parameters) + {steps} LoRA distillation steps "
             f"(`{LORA}`). One thread.", "",
             "| variant | pass | before | after | after - original | convert s |", "|---|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        after = r.get("after")
        delta = f"{after['accuracy'] - original:+.4f}" if isinstance(after, dict) else "-"
        secs = f"{after['seconds']:.1f}" if isinstance(after, dict) else "-"
        lines.append(f"| {name} | `{r['spec']}` | {cell(r.get('before'))} | {cell(after)} | {delta} | {secs} |")
    reverted = any(isinstance(r.get("after"), dict) and "distill_reverted" in r["after"] for r in rows.values())
    lines += ["", ("(reverted): the distillation raised its own loss on the calibration images and was undone; the "
                   "figure is the model after attention transfer. " if reverted else "")
              + "The 1-D window and block forms leave the CLS token (position 0), which the classifier reads, "
              "a few neighbouring patches instead of all 16: before conversion they predict one class for every "
              "image. Axial keeps the CLS token global and each patch its grid row and column."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
