"""Do ``rotate`` / ``smooth-quant`` help simulated W4A8 and W4A4 quantization? Prints a markdown table.

For each model, the same simulated quantization
(:func:`ptool.passes.quant.simulate.simulate_quantization`: every Linear's weight per-output-channel
symmetric 4-bit, every Linear input per-token dynamic symmetric 8- or 4-bit) is applied to the
captured graph as is ("none") and after each exact transform: ``smooth-quant`` (alpha 0.5),
``rotate`` (Hadamard), ``rotate`` then ``smooth-quant``, ``rotate:method=learned`` and
``rotate:method=flatquant`` (each trained for the bit width of the row; ``--flat-steps`` steps per
block). The transforms are exact in float, so every difference is
quantization error.

Models:

- **llama**: ``tests.models.zoo.llama()`` (Llama architecture, random weights, hidden 32,
  2 layers, 4 heads / 2 KV heads, vocabulary 128). Random weights have no outlier channels,
  unlike trained LLMs, so two variants add ``--outlier-channels`` (default 2) channels scaled by
  ``--outlier-scale`` (default 20): ``llama-gamma`` scales those entries of every RMSNorm gamma
  (the norm outputs get a few dominant channels; after ``rotate`` folds gamma into the readers,
  those columns sit in the weights instead), ``llama-stream`` scales those channels of the
  residual stream itself (token-embedding columns and o_proj/down_proj output rows: the
  "massive activations" of trained LLMs; RMSNorm then squeezes the other channels; with random
  weights this makes the logits nearly input-independent, so it is not in the default run).
  Calibration: 8 batches of random tokens (2 x 16); held-out: 16 other batches. Metrics vs the
  float model: mean cosine of the logits per token and the mean KL(float || quantized) of the
  next-token distributions, over non-padding tokens. lm_head stays in float (as in
  QuaRot/SpinQuant).
- **minilm**: the sentence embedder with the real all-MiniLM-L6-v2 weights (mean pooling + L2
  norm), 64 tokens. Calibration: 8 batches of 8 rows of continuous text from
  ``ptool.default_model.reference_sentences``; held-out: the 64 sentences shipped with ptool
  (``sample_sentences``), 8 per batch, padded. Metric: mean cosine between the float and the
  quantized sentence embeddings.

QSUR columns: the mean over the transformed Linear inputs of the per-dimension QSUR
(``ptool.passes.quant.diagnostics``) on the calibration data, before the first transform and
after the last.

    .venv/bin/python tools/eval_rotate.py [--models llama,llama-gamma,minilm] [--methods "rotate hadamard"]
        [--learn-steps 100] [--learn-lr 0.01] [--flat-steps 100] [--flat-lr 0.01] [--bits W4A8,W4A4]

With ``--methods`` or ``--bits`` the rows run replace those of the same model, method and bits in
the section; the other rows are kept.

About 15 minutes on 2 busy cores, most of it the learned transforms of MiniLM.
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
from ptool.passes.quant.rotate import Rotate  # noqa: E402
from ptool.passes.quant.simulate import simulate_quantization  # noqa: E402
from ptool.passes.quant.smooth import SmoothQuant  # noqa: E402
from _sections import update_section  # noqa: E402  (tools/ is on sys.path when run as a script)

BITS = {"W4A8": (4, 8), "W4A4": (4, 4)}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def methods(act_bits: int, learn_steps: int, learn_lr: float, flat_steps: int, flat_lr: float) -> dict[str, list]:
    return {
        "none": [],
        "smooth-quant": [SmoothQuant()],
        "rotate hadamard": [Rotate()],
        "rotate hadamard + smooth-quant": [Rotate(), SmoothQuant()],
        "rotate learned": [Rotate(method="learned", train_steps=learn_steps, lr=learn_lr, weight_bits=4,
                                  act_bits=act_bits)],
        "rotate flatquant": [Rotate(method="flatquant", train_steps=flat_steps, lr=flat_lr, weight_bits=4,
                                    act_bits=act_bits)],
    }


# ------------------------------------------------------------------------------ models and data
def llama_case(outliers: str, channels: int, scale: float):
    """zoo.llama with ``channels`` outlier channels of ``scale`` x: in every RMSNorm gamma (``gamma``),
    or in the residual stream itself (``stream``: those columns of the token embeddings and rows
    of o_proj / down_proj, the "massive activations" of trained LLMs), or none."""
    from tests.models import zoo

    f = zoo.llama()
    with torch.no_grad():
        for name, module in f.model.named_modules():
            if outliers == "gamma" and type(module).__name__.endswith("RMSNorm"):
                module.weight[:channels] *= scale
            if outliers == "stream" and (name.endswith(("o_proj", "down_proj")) or name.endswith("embed_tokens")):
                weight = module.weight
                (weight[:, :channels] if name.endswith("embed_tokens") else weight[:channels]).mul_(scale)
    calib = [a for a, _ in f.batches(8, seed=100)]
    heldout = [a for a, _ in f.batches(16, seed=1000)]
    return f.model, calib, heldout


def minilm_case():
    from ptool.default_model import encode, load_embedder, packed_batches, reference_sentences
    from ptool.frontends.huggingface import sample_sentences

    seq, batch = 64, 8
    calib = packed_batches(reference_sentences(), seq, batch, count=8)
    ids, mask = encode(sample_sentences(), seq)
    heldout = [(ids[i:i + batch], mask[i:i + batch]) for i in range(0, len(ids) // batch * batch, batch)]
    return load_embedder(), calib, heldout


def logits_metrics(reference, model, batches) -> dict[str, float]:
    cos, kl = [], []
    with torch.no_grad():
        for ids, mask in batches:
            ref, out = reference(ids, mask).logits, model(ids, mask).logits
            keep = mask.bool()
            ref, out = ref[keep], out[keep]
            cos.append(torch.nn.functional.cosine_similarity(ref, out, dim=-1))
            kl.append(torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                                 reduction="none").sum(-1))
    return {"cosine": float(torch.cat(cos).mean()), "kl": float(torch.cat(kl).mean())}


def embedding_metrics(reference, model, batches) -> dict[str, float]:
    cos = []
    with torch.no_grad():
        for args in batches:
            cos.append(torch.nn.functional.cosine_similarity(reference(*args), model(*args), dim=-1))
    return {"cosine": float(torch.cat(cos).mean())}


# ------------------------------------------------------------------------------ the run
def evaluate(case: str, model, calib, heldout, learn_steps: int, learn_lr: float, flat_steps: int, flat_lr: float,
             only: list[str], bits: list[str]) -> list[dict]:
    is_lm = case.startswith("llama")
    metrics = logits_metrics if is_lm else embedding_metrics
    reference = ptool.transform(model, [], calib[0])  # the captured float graph
    exclude = ("lm_head",) if is_lm else ()
    rows, transformed = [], {}
    for bits_name, (wbits, abits) in BITS.items():
        if bits_name not in bits:
            continue
        for method, passes in methods(abits, learn_steps, learn_lr, flat_steps, flat_lr).items():
            if only and method not in only and method != "none":
                continue
            key = method if method not in ("rotate learned", "rotate flatquant") else f"{method} A{abits}"
            start = time.perf_counter()
            if key not in transformed:
                transformed[key] = ptool.transform(model, passes, calib[0], calibration=calib)
            m2 = transformed[key]
            sim = simulate_quantization(m2.graph_module, weight_bits=wbits, act_bits=abits, exclude=exclude)
            row = {"model": case, "method": method, "bits": bits_name, **metrics(reference, sim, heldout)}
            if passes:  # QSUR before the first transform, after the last
                row["qsur_before"] = m2.report[0].notes.get("mean", {}).get("before", {}).get("qsur")
                row["qsur_after"] = m2.report[-1].notes.get("mean", {}).get("after", {}).get("qsur")
            row["seconds"] = time.perf_counter() - start
            log(f"{row}")
            rows.append(row)
    for row in rows:  # "none": the QSUR the transforms start from
        if row["method"] == "none":
            row["qsur_before"] = next(r["qsur_before"] for r in rows if r.get("qsur_before") is not None)
    return rows


def markdown(rows: list[dict]) -> str:
    has_kl = any("kl" in r for r in rows)
    head = ["model", "method", "bits", "cosine vs float"] + (["KL(float‖quant)"] if has_kl else []) + \
        ["QSUR before", "QSUR after"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        cells = [r["model"], r["method"], r["bits"], fmt(r["cosine"], ".5f")]
        if has_kl:
            cells.append(fmt(r.get("kl"), ".2e"))
        after = r.get("qsur_after") if r["method"] != "none" else None
        cells += [fmt(r.get("qsur_before"), ".3f"), fmt(after, ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llama,llama-gamma,minilm",
                   help="comma-separated: llama (no outliers), llama-gamma, llama-stream, minilm")
    p.add_argument("--methods", default="", help="comma-separated method names to run (default: all)")
    p.add_argument("--learn-steps", type=int, default=100)
    p.add_argument("--learn-lr", type=float, default=1e-2)
    p.add_argument("--flat-steps", type=int, default=100)
    p.add_argument("--flat-lr", type=float, default=1e-2)
    p.add_argument("--bits", default="W4A8,W4A4", help="comma-separated: W4A8, W4A4")
    p.add_argument("--outlier-channels", type=int, default=2)
    p.add_argument("--outlier-scale", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="print the table instead of updating BENCHMARKS.md")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = []
    for case in a.models.split(","):
        outliers = f"{a.outlier_channels} ch. x{a.outlier_scale:g}"
        if case == "llama":
            model, calib, heldout = llama_case("none", 0, 1.0)
            label = "llama (random, no outliers)"
        elif case in ("llama-gamma", "llama-stream"):
            where = case.split("-")[1]
            model, calib, heldout = llama_case(where, a.outlier_channels, a.outlier_scale)
            label = f"llama ({where} outliers {outliers})"
        elif case == "minilm":
            model, calib, heldout = minilm_case()
            label = "minilm (real weights)"
        else:
            raise SystemExit(f"unknown model {case!r} (allowed: llama, llama-gamma, llama-stream, minilm)")
        only = [m for m in a.methods.split(",") if m]
        rows += evaluate(label, model, calib, heldout, a.learn_steps, a.learn_lr, a.flat_steps, a.flat_lr, only,
                         a.bits.split(","))
    if a.no_write:
        print(markdown(rows))
        return
    settings = {"learn_steps": a.learn_steps, "flat_steps": a.flat_steps}

    def merged(old: dict) -> tuple[str, dict]:
        """The rows of this run replace those of the same (model, method, bits); the others are kept."""
        key = lambda r: (r["model"], r["method"], r["bits"])  # noqa: E731
        new = {key(r): r for r in rows}
        kept = [r for r in old.get("rows", []) if key(r) not in new]
        order = {m: i for i, m in enumerate(methods(4, 1, 1.0, 1, 1.0))}
        models = list(dict.fromkeys(r["model"] for r in [*old.get("rows", []), *rows]))
        out = sorted([*kept, *new.values()], key=lambda r: (models.index(r["model"]), list(BITS).index(r["bits"]),
                                                             order.get(r["method"], len(order))))
        return markdown(out), {**old, "rows": out, **settings}

    print(update_section("rotate_quant", merged))


if __name__ == "__main__":
    main()
