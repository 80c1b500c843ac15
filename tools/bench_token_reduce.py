"""token-reduce: accuracy without training, FLOPs and measured speed on torch, ONNX Runtime and TVM.

Writes the ``token-reduce`` section of ``BENCHMARKS.md``.

Models:

* **digits ViT** (``tests/models/digits_vit.py``): trained, 17 tokens (CLS + 4x4 patches), 2 layers;
* **digits DeiT** (``tests/models/digits_deit.py``): trained, DeiT-style (CLS + distillation token + 8x8
  patches = 66 tokens), 6 layers;
* **DeiT-tiny shape** (random weights, HF ``DeiTConfig``: 224 px, patch 16, 198 tokens, hidden 192,
  12 layers, 3 heads): structure and speed only (its accuracy means nothing).

Accuracy: top-1 on the whole digits test split (540 images, batches of 64, the last padded), no
training. The defaults (inside every block after the attention, ``transform`` at temperature 0.005 on the tokens' similarity,
proportional attention, geometric schedule) at the largest ``keep`` (steps of 0.05) that removes at
least 40% of the matmul-class FLOPs (``ptool/ir/flops.py``); each variant (method, keys similarity, no
proportional attention) at that keep; the constant schedule and the earlier placement (before every
block but the first, ``prune``) at their own keep for 40%; then a few more settings. Speed: original vs
the defaults at 40% or more, on torch eager, ONNX Runtime and TVM (untuned default schedules),
one thread each, timed side by side (round-robin, medians); max |diff| of ORT / TVM vs the reduced
torch model.

    .venv/bin/python tools/bench_token_reduce.py [--no-write] [--skip-tvm] [--only digits-vit,deit-tiny]

A run with ``--only`` replaces its models' rows in the section and keeps the others'.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from _sections import update_section  # noqa: E402

import ptool  # noqa: E402
from ptool.benchmark import measure_interleaved  # noqa: E402

BATCH = 64
TARGET = 0.40
VARIANTS = ("method=merge", "temperature=0.1", "method=prune", "method=fuse", "method=bipartite", "similarity=keys",
            "proportional=false")
"""Changed one at a time from the defaults (where=mlp, method=transform at temperature 0.005, similarity=hidden,
proportional, geometric)."""
OWN_KEEP = ("schedule=constant", "where=block,method=prune")
"""Options whose FLOPs at a keep differ from the defaults': searched for their own keep (the second is the
pass's earlier placement and its best method there, for comparison)."""


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def accuracy(model, x, y) -> float:
    """Top-1 in batches of the traced size (the last one padded)."""
    from tests.models.digits_vit import accuracy as top1

    return top1(model, x, y, BATCH, pad=True)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def reduce(make, spec: str, args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ptool.transform(make(), [spec], args)


def keep_for_target(make, options: str, args) -> tuple[str, object]:
    """The largest keep (0.95, 0.90, ...) whose FLOPs saving reaches TARGET with ``options``; its spec and model."""
    def attempt(step: int):
        spec = f"token-reduce:keep={step * 0.05:.2f}" + (f",{options}" if options else "")
        m = reduce(make, spec, args)
        return spec, m, m.report[0].notes.get("flops_removed", 0) >= TARGET

    lo, hi, found = 1, 19, None  # bisect on steps of 0.05: the saving falls as keep grows
    while lo <= hi:
        mid = (lo + hi) // 2
        spec, m, ok = attempt(mid)
        if ok:
            found, lo = (spec, m), mid + 1
        else:
            hi = mid - 1
    if found is None:
        raise RuntimeError(f"no keep reaches {TARGET:.0%} fewer FLOPs with {options or 'the defaults'}")
    return found


def accuracy_rows(name: str, make, data, extra: list[str]) -> list[dict]:
    """The defaults at the largest keep reaching TARGET, each variant at that keep, the constant schedule and
    the reduction before blocks (each at its own keep for TARGET), then ``extra`` specs."""
    x, y = data.x_test, data.y_test
    args = (x[:BATCH],)
    original = accuracy(make(), x, y)
    rows = []
    spec, m = keep_for_target(make, "", args)
    candidates = [(spec, m)] + [(f"{spec},{v}", reduce(make, f"{spec},{v}", args)) for v in VARIANTS]
    candidates += [keep_for_target(make, options, args) for options in OWN_KEEP]
    candidates += [(spec, reduce(make, spec, args)) for spec in extra]
    for spec, m in candidates:
        r = m.report[0]
        acc = accuracy(m, x, y)
        rows.append({"model": name, "spec": spec, "tokens": r.notes.get("tokens_per_block", "-"),
                     "flops_removed": r.notes.get("flops_removed", 0.0), "original": original, "accuracy": acc,
                     "cosine": r.fidelity.cosine})
        log(f"{name} {spec}: {rows[-1]}")
    return rows


def speed_row(name: str, original, reduced, args, *, tvm: bool, repeat: int) -> dict:
    """Original vs reduced on torch / ORT / TVM, interleaved; errors of ORT / TVM vs reduced torch."""
    r = reduced.report[0]
    candidates = {"torch orig": original, "torch reduced": reduced}
    built = {}
    for backend in ("onnxruntime", *(("tvm",) if tvm else ())):
        opts = {"intra_op_threads": 1} if backend == "onnxruntime" else {}
        start = time.perf_counter()
        built[f"{backend} orig"] = ptool.compile(original, backend=backend, example_inputs=args, **opts)
        built[f"{backend} reduced"] = ptool.compile(reduced, backend=backend, **opts)
        log(f"{name}: built {backend} in {time.perf_counter() - start:.0f} s")
    candidates.update(built)
    with torch.no_grad():
        ref = _logits(reduced(*args))
        errors = {k.split()[0]: float((_logits(f(*args)) - ref).abs().max()) for k, f in built.items()
                  if k.endswith("reduced")}
    t = measure_interleaved(candidates, args, repeat=repeat, warmup=2)
    med = {k: v.median_ms for k, v in t.items()}
    row = {"model": name, "spec": r.spec, "tokens": r.notes.get("tokens_per_block"),
           "flops_removed": r.notes.get("flops_removed"), "cosine": r.fidelity.cosine, "ms": med,
           "spread": {k: v.spread for k, v in t.items()}, "max_abs_vs_torch": errors}
    log(f"{name} speed: {row}")
    return row


def deit_tiny():
    from transformers import DeiTConfig, DeiTForImageClassification

    torch.manual_seed(0)
    config = DeiTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                        intermediate_size=768, num_labels=1000)
    return DeiTForImageClassification._from_config(config, attn_implementation="sdpa").eval()


def markdown(acc_rows: list[dict], speed: list[dict]) -> str:
    lines = ["## Token reduction (`tools/bench_token_reduce.py`)", "",
             "`token-reduce` (Token Transforming; ToMe-style `merge`, bipartite matching and proportional attention, "
             "EViT-style `prune` / `fuse` as its special cases), training-free. Accuracy: top-1 on the whole digits "
             "test split (540 images), before and after, no training. First the defaults (`where=mlp`: inside every "
             "block, after the attention; `method=transform` at `temperature=0.005`, a sharp softmax; "
             "`similarity=hidden`, `proportional=true`, geometric schedule) at the largest `keep` (steps of 0.05) that removes at least 40% of the matmul-class FLOPs, "
             "then one option changed at a time at that keep, then the constant schedule and the earlier placement "
             "(`where=block`: before every block but the first) at their own keep for 40%, then other settings. "
             "Tokens per block: `attention>MLP` where a stage sits inside the block.",
             "",
             "| model | spec | tokens per block | FLOPs removed | top-1 before | top-1 after | change (points) | "
             "cosine (logits) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in acc_rows:
        lines.append(f"| {r['model']} | `{r['spec']}` | {r['tokens']} | {r['flops_removed']:.1%} | "
                     f"{r['original']:.2%} | {r['accuracy']:.2%} | {(r['accuracy'] - r['original']) * 100:+.2f} | "
                     f"{r['cosine']:.4f} |")
    lines += ["", "Speed: original vs reduced model, one thread each (torch `set_num_threads(1)`, ONNX Runtime "
              "`intra_op_threads=1`, TVM untuned default schedules with `TVM_NUM_THREADS=1`), round-robin, median ms; "
              "speed-up = original / reduced on the same backend. Max |diff| = the backend's logits vs the reduced "
              "torch model. Noise: the largest (p90 - p10) / median of the row's six candidates (above ~0.2 the "
              "machine was busy: this 2-core machine was shared with other jobs, so read the ratios, not the ms).", "",
              "| model | spec | tokens per block | FLOPs removed | torch orig / reduced ms | torch speed-up | "
              "ORT orig / reduced ms | ORT speed-up | TVM orig / reduced ms | TVM speed-up | max abs diff ORT / TVM | noise |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in speed:
        ms, err = r["ms"], r["max_abs_vs_torch"]

        def pair(b):
            o, n = ms.get(f"{b} orig"), ms.get(f"{b} reduced")
            return ("-", "-") if o is None else (f"{o:.2f} / {n:.2f}", f"{o / n:.2f}x")

        (tp, ts), (op, os_), (vp, vs) = pair("torch"), pair("onnxruntime"), pair("tvm")
        errs = " / ".join(f"{err[k]:.1e}" if k in err else "-" for k in ("onnxruntime", "tvm"))
        lines.append(f"| {r['model']} | `{r['spec']}` | {r['tokens']} | {r['flops_removed']:.1%} | {tp} | {ts} | "
                     f"{op} | {os_} | {vp} | {vs} | {errs} | {max(r['spread'].values()):.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--skip-tvm", action="store_true")
    p.add_argument("--only", default="", help="comma-separated: digits-vit, digits-deit, deit-tiny")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--render-only", action="store_true", help="rewrite the section from the stored rows")
    a = p.parse_args()
    if a.render_only:
        print(update_section("token-reduce", lambda old: (markdown(old["accuracy"], old["speed"]), old)))
        return
    only = [w for w in a.only.split(",") if w]
    want = (lambda name: not only or name in only)
    torch.set_num_threads(1)
    import os

    os.environ.setdefault("TVM_NUM_THREADS", "1")
    from tests.models.digits_deit import digits_deit
    from tests.models.digits_vit import digits_vit

    acc_rows, speed = [], []
    if want("digits-vit"):
        d = digits_vit(0)
        make = lambda: digits_vit(0).model  # noqa: E731
        rows = accuracy_rows("digits ViT (17 tokens, 2 blocks)", make, d.data,
                             ["token-reduce:keep=0.6,layers=1,where=block,proportional=false"])
        acc_rows += rows
        args = (d.data.x_test[:BATCH],)
        speed.append(speed_row("digits ViT, batch 64", make(), reduce(make, rows[0]["spec"], args), args,
                               tvm=not a.skip_tvm, repeat=a.repeat))
    if want("digits-deit"):
        d = digits_deit(0)
        make = lambda: digits_deit(0).model  # noqa: E731
        rows = accuracy_rows("digits DeiT (66 tokens, 6 blocks)", make, d.data,
                             ["token-reduce:keep=0.75", "token-reduce:keep=0.7"])
        acc_rows += rows
        args = (d.data.x_test[:BATCH],)
        speed.append(speed_row("digits DeiT, batch 64", make(), reduce(make, rows[0]["spec"], args), args,
                               tvm=not a.skip_tvm, repeat=a.repeat))
    if want("deit-tiny"):
        args = (torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)
        spec, m = keep_for_target(deit_tiny, "", args)
        speed.append(speed_row("DeiT-tiny shape (random weights), batch 4", deit_tiny(), m, args,
                               tvm=not a.skip_tvm, repeat=max(5, a.repeat // 2)))
    if a.no_write:
        print(markdown(acc_rows, speed))
        return

    def render(old: dict) -> tuple[str, dict]:
        """This run's rows replace the earlier rows of the same models; the other models' rows stay."""
        mine = {r["model"] for r in acc_rows} | {r["model"] for r in speed}
        merged = {"accuracy": [r for r in old.get("accuracy", []) if r["model"] not in mine] + acc_rows,
                  "speed": [r for r in old.get("speed", []) if r["model"] not in mine] + speed}
        return markdown(merged["accuracy"], merged["speed"]), merged

    print(update_section("token-reduce", render))


if __name__ == "__main__":
    main()
