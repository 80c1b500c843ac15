"""Fidelity of every attention variant on all-MiniLM-L6-v2 (real weights), before and after conversion.

Writes the "Attention fidelity" section of ``BENCHMARKS.md`` (key ``attention_fidelity``).

Protocol: the sentence embedder (MiniLM + mean pooling + L2 norm) at 128 tokens. Calibration and
distillation data are rows of continuous English from the Python reference manual bundled with
CPython (``ptool.default_model.reference_sentences``), or, with ``--calibration-text wordnet`` and
in the recipes that name it, WordNet's everyday usage examples (``everyday_sentences``); held-out
data are the 64 sentences shipped with ptool, which the conversion never sees, in two forms: one
sentence per row padded to 128 tokens (the real use: padding masks matter) and the same sentences
packed into full 128-token rows (the first 8 rows, ~45 sentences; every position a real token, so
top-k at 25% keeps 32 of 128 real keys). The figure is
the mean cosine between the converted and the original model's embeddings.

"before" = the swap alone (``transfer_steps=0``); "after" = attention transfer (kernels with
parameters) + end-to-end LoRA distillation against the original model (``distill_steps``, every
variant: parameter-free kernels are recovered through the adapters on their projections).

    OMP_NUM_THREADS=1 .venv/bin/python tools/eval_attention.py [--only hedgehog,sea] [--distill-steps 150]

``--recipes`` evaluates instead the full conversion recipes in ``RECIPES`` (each spec carries all
its options; the issue-3 targets) and writes them as the section's "Conversion recipes" table,
keeping the variant rows of the last full run:

    OMP_NUM_THREADS=1 .venv/bin/python tools/eval_attention.py --recipes

``--render`` rewrites the section from ``BENCHMARKS.json`` without measuring anything. Rows measured
with other settings than the stored table replace it, unless ``--keep-rows``: then the table's rows
stay and the new rows carry their settings (a footnote says them), e.g. short conversions of new
variants next to the full ones:

    OMP_NUM_THREADS=1 .venv/bin/python tools/eval_attention.py --only gla --transfer-steps 40 \
        --distill-steps 40 --keep-rows
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import NamedTuple

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ptool  # noqa: E402
from _sections import read_section, update_section, write_section  # noqa: E402
from _minilm import calibration_batches, heldout_batches, log, mean_cosine  # noqa: E402
from ptool.default_model import load_embedder, packed_batches  # noqa: E402
from ptool.frontends.huggingface import sample_sentences  # noqa: E402

SEQ, BATCH = 128, 8
TEXTS = {"python-docs": "the Python reference manual", "wordnet": "WordNet's everyday usage examples"}
TRAINING_NOTES = ("transfer_stopped", "distill_stopped", "distill_reverted")
"""The report notes that say a conversion's training stopped early or was undone (kept in the rows)."""
FORMS = {"packed": "packed rows", "padded": "one padded sentence per row",
         "mixed": "padded-sentence and packed batches alternating"}

#: name -> (pass spec, kernel has parameters to convert)
VARIANTS = {
    "hedgehog": ("linear-attention:feature_map=hedgehog", True),
    "elu": ("linear-attention:feature_map=elu", False),
    "relu (SLAB, +dwconv)": ("linear-attention:feature_map=relu,local=true", True),
    "performer": ("linear-attention:feature_map=performer", False),
    "transnormer": ("linear-attention:feature_map=transnormer", True),
    "inline (+local)": ("linear-attention:feature_map=inline,local=true", True),
    "flow": ("linear-attention:feature_map=flow", False),
    "hash (EcoFormer)": ("linear-attention:feature_map=hash", True),
    "sigmoid": ("sigmoid-attention", True),
    "hedgehog + window 32 (LoLCATs hybrid)": ("linear-attention:feature_map=hedgehog,window=32", True),
    "gla (hedgehog features, data-dependent decay)": ("linear-attention:feature_map=hedgehog,mixer=gla", True),
    "delta (DeltaNet rule, hedgehog features)": ("linear-attention:feature_map=hedgehog,mixer=delta", True),
    "retnet (fixed decay, hedgehog features)": ("linear-attention:feature_map=hedgehog,mixer=retnet", True),
    "softplus": ("softplus-attention", False),
    "topk k=25%": ("sparse-attention:method=topk,k=0.25", False),
    "topk k=25%, tail dropped": ("sparse-attention:method=topk,k=0.25,tail=drop", False),
    "sea k=25%": ("sparse-attention:method=sea,k=0.25", True),
    "sea k=25%, tail dropped": ("sparse-attention:method=sea,k=0.25,tail=drop", True),
    "window 32": ("sparse-attention:method=window,window=32", False),
    "block-diag 32": ("sparse-attention:method=block-diag,block_size=32", False),
}


class Recipe(NamedTuple):
    """A full conversion recipe, run as written (no options appended)."""

    spec: str
    form: str  # calibration rows: packed, padded or mixed (``_minilm.calibration_batches``)
    target: float  # on the padded held-out column
    text: str = "python-docs"  # or "wordnet"
    batches: int = 16


LORA = "distill_params=lora,distill_lr=0.001,distill_site_weight=1"
HEDGEHOG = "linear-attention:feature_map=hedgehog,feature_dim=64,transfer_steps={steps},distill_steps={steps}," + LORA

#: the longer conversions that reach issue 3's targets
RECIPES = {
    "sea k=25%, rank-12 estimator + LoRA distillation": Recipe(
        "sparse-attention:method=sea,feature_dim=12,transfer_steps=100,distill_steps=100,distill_params=lora,"
        "distill_lr=0.0005,distill_site_weight=1", "mixed", 0.98),
    "hedgehog, 64 features + LoRA distillation": Recipe(HEDGEHOG.format(steps=300), "mixed", 0.95),
    "hedgehog hybrid: softmax kept in site 1 (its worst fit), same recipe": Recipe(
        HEDGEHOG.format(steps=300).replace("feature_dim=64,", "feature_dim=64,layers=0+2+3+4+5,"), "mixed", 0.95),
    "hedgehog on everyday text (64 batches): 64 features + LoRA distillation, 600 steps": Recipe(
        HEDGEHOG.format(steps=600), "mixed", 0.95, "wordnet", 64),
    "hedgehog on everyday text (128 batches): same, 900 steps": Recipe(
        HEDGEHOG.format(steps=900), "mixed", 0.95, "wordnet", 128),
}


def data(calibration: int, form: str = "packed", text: str = "python-docs"):
    calib = calibration_batches(SEQ, BATCH, calibration, form, text)
    padded = heldout_batches(SEQ, BATCH)
    packed = packed_batches(sample_sentences(), SEQ, BATCH)  # one batch: the first 8 full rows (~45 sentences)
    return calib, padded, packed


def convert(model, spec: str, calib, *, trainable: bool, after: bool, transfer_steps: int, distill_steps: int):
    spec += "," if ":" in spec else ":"
    if not after:
        spec += "transfer_steps=0"
        return ptool.transform(model, [spec], calib[0], calibration=None if not trainable else calib)
    spec += f"transfer_steps={transfer_steps if trainable else 0},distill_steps={distill_steps}"
    if distill_steps:
        spec += "," + LORA
    return ptool.transform(model, [spec], calib[0], calibration=calib)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="", help="comma-separated variant names (prefix match)")
    p.add_argument("--transfer-steps", type=int, default=150)
    p.add_argument("--distill-steps", type=int, default=150,
                   help="end-to-end LoRA distillation steps after the transfer, every variant (0: none)")
    p.add_argument("--calibration-batches", type=int, default=16)
    p.add_argument("--calibration-form", default="mixed", choices=("packed", "padded", "mixed"),
                   help="calibration rows: packed text, one padded sentence per row, or alternating")
    p.add_argument("--calibration-text", default="wordnet", choices=("python-docs", "wordnet"),
                   help="calibration sentences: the Python reference manual or WordNet's everyday usage examples")
    p.add_argument("--recipes", action="store_true", help="evaluate RECIPES (the issue-3 targets) only")
    p.add_argument("--render", action="store_true",
                   help="measure nothing: rewrite the section from what BENCHMARKS.json holds")
    p.add_argument("--keep-rows", action="store_true",
                   help="with other settings than the stored table: keep its rows and mark the new ones with "
                        "their own settings (default: a table of other settings is replaced)")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    if a.recipes or a.render:
        return run_recipes(a)
    calib, padded, packed = data(a.calibration_batches, a.calibration_form, a.calibration_text)
    reference = load_embedder()
    wanted = [w for w in a.only.split(",") if w]
    for name, (spec, trainable) in VARIANTS.items():
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        row = {"spec": spec}
        stages = ("before", "after") if trainable or a.distill_steps else ("before",)
        for stage in stages:
            start = time.perf_counter()
            try:
                model = convert(load_embedder(), spec, calib, trainable=trainable, after=stage == "after",
                                transfer_steps=a.transfer_steps, distill_steps=a.distill_steps)
            except Exception as e:
                row[stage] = f"failed: {str(e)[:160]}"
                log(f"{name} {stage}: {row[stage]}")
                continue
            row[stage] = {"padded": mean_cosine(reference, model, padded),
                          "packed": mean_cosine(reference, model, packed),
                          "seconds": time.perf_counter() - start}
            notes = model.report[0].notes
            row[stage] |= {k: notes[k] for k in TRAINING_NOTES if k in notes}
            log(f"{name} {stage}: {row[stage]}")
        if a.no_write:
            print(markdown({name: row}, a))
        else:
            save_row(name, row, a)


def settings(a) -> dict:
    """The conversion settings a variant row was measured with (rows of other settings are not mixed in)."""
    return {"transfer_steps": a.transfer_steps, "distill_steps": a.distill_steps,
            "calibration_batches": a.calibration_batches, "calibration_form": a.calibration_form,
            "calibration_text": a.calibration_text}


def save_row(name: str, row: dict, a) -> None:
    """Merge one variant's row into the stored section as soon as it is measured: shards of a run
    (``--only``) can go side by side, and a crash keeps what finished. Rows measured with other
    settings are dropped; the recipes table is kept."""
    def render(earlier: dict) -> tuple[str, dict]:
        same = all(earlier.get(k) == v for k, v in settings(a).items())
        recipes = earlier.get("recipes")
        if not same and a.keep_rows and earlier.get("rows"):  # the row says its own settings
            table = {k: earlier[k] for k in settings(a) if k in earlier}
            rows = {**earlier["rows"], name: {**row, "settings": settings(a)}}
            rows = {k: rows[k] for k in VARIANTS if k in rows}
            shown = argparse.Namespace(**{**vars(a), **table})
            return markdown(rows, shown, recipes), {"rows": rows, **table, **({"recipes": recipes} if recipes else {})}
        rows = {**(earlier.get("rows", {}) if same else {}), name: row}
        rows = {k: rows[k] for k in VARIANTS if k in rows}
        return markdown(rows, a, recipes), {"rows": rows, **settings(a), **({"recipes": recipes} if recipes else {})}

    update_section("attention_fidelity", render)


def run_recipes(a) -> None:
    reference = load_embedder()
    results = {}
    wanted = [w for w in a.only.split(",") if w]
    for name, r in RECIPES.items():
        if a.render or (wanted and not any(name.startswith(w) for w in wanted)):
            continue
        calib, padded, packed = data(r.batches, r.form, r.text)
        start = time.perf_counter()
        model = ptool.transform(load_embedder(), [r.spec], calib[0], calibration=calib)
        results[name] = {"spec": r.spec, "calibration": f"{r.batches} {r.form}, {r.text}", "target": r.target,
                         "padded": mean_cosine(reference, model, padded),
                         "packed": mean_cosine(reference, model, packed), "seconds": time.perf_counter() - start}
        log(f"{name}: {results[name]}")
    earlier = read_section("attention_fidelity")
    if not earlier.get("rows"):
        raise SystemExit("run tools/eval_attention.py without --recipes first (the variant table)")
    kept = argparse.Namespace(**{**vars(a), **{k: earlier[k] for k in settings(a) if k in earlier}})
    md = markdown(earlier["rows"], kept, {**earlier.get("recipes", {}), **results})
    if a.no_write:
        print(md)
        return
    print(write_section("attention_fidelity", md, {**earlier, "recipes": {**earlier.get("recipes", {}), **results}}))


def recipes_markdown(recipes: dict) -> list[str]:
    lines = ["", f"Conversion recipes (issue 3 targets; `tools/eval_attention.py --recipes`, {BATCH}-row batches of "
             f"{SEQ} tokens, each spec as written, one core):", "",
             "| recipe | pass | calibration | padded | packed | target (padded) | convert s |",
             "|---|---|---|---:|---:|---:|---:|"]
    for name, r in recipes.items():
        met = "met" if r["padded"] >= r["target"] else "not met"
        lines.append(f"| {name} | `{r['spec']}` | {r['calibration']} | {r['padded']:.4f} | {r['packed']:.4f} "
                     f"| {r['target']} ({met}) | {r['seconds']:.0f} |")
    return lines


def markdown(rows: dict, a, recipes: dict | None = None) -> str:
    def cell(x, key):
        if x is None:
            return "-"
        return f"{x[key]:.4f}" if isinstance(x, dict) else "failed"

    lines = ["## Attention fidelity on all-MiniLM-L6-v2 (`tools/eval_attention.py`)", "",
             "Mean cosine of sentence embeddings, converted vs original model, on the 64 held-out sentences "
             f"(never used for conversion). Conversion data: {a.calibration_batches} batches x {BATCH} rows x "
             f"{SEQ} tokens of {TEXTS[a.calibration_text]} ({FORMS[a.calibration_form]}). before = the swap alone; "
             f"after = {a.transfer_steps} attention-transfer steps (kernels with parameters)" +
             (f" + {a.distill_steps} end-to-end distillation steps against the original model, every variant "
              f"(`{LORA}`: LoRA adapters on the q/k/v/o projections of each site and the kernels' parameters, "
              "output loss + layer-wise term)" if a.distill_steps else
              ", no end-to-end distillation; '-' = parameter-free, nothing to convert") + ".", "",
             "| variant | pass | before, padded | before, packed | after, padded | after, packed | convert s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    footnotes = []
    for name, r in rows.items():
        after = r.get("after")
        secs = f"{after['seconds']:.0f}" if isinstance(after, dict) else "-"
        said = [after[k] for k in TRAINING_NOTES if isinstance(after, dict) and k in after]
        own = r.get("settings")
        if own and any(own.get(k) != v for k, v in settings(a).items()):
            said.insert(0, f"converted with {own['transfer_steps']} transfer + {own['distill_steps']} distillation "
                           f"steps on {own['calibration_batches']} batches ({own['calibration_form']}, "
                           f"{own['calibration_text']}), not the table's")
        if said:
            footnotes.append(f"[{len(footnotes) + 1}] {name}: " + "; ".join(said) + ".")
        mark = f" [{len(footnotes)}]" if said else ""
        lines.append(f"| {name} | `{r['spec']}` | {cell(r.get('before'), 'padded')} | {cell(r.get('before'), 'packed')} "
                     f"| {cell(after, 'padded')}{mark} | {cell(after, 'packed')}{mark} | {secs} |")
    lines += ["", *([*footnotes, ""] if footnotes else []), "convert s: one core per conversion, two conversions side by side. "
              "`sparse-attention:method=axial` is not in the table: it needs a 2-D grid of patch tokens (ViT), "
              "and on a text model the pass leaves every site as it is and says why."]
    if recipes:
        lines += recipes_markdown(recipes)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
