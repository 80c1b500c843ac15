"""Convert a model's attention to hedgehog linear attention, in one process or data-parallel, and save
the trained kernel weights: what the data-parallel test and benchmark launch.

    PYTHONPATH=. python tools/convert_parallel.py -o one.pt                                  # one process
    PYTHONPATH=. torchrun --nproc-per-node 2 tools/convert_parallel.py -o two.pt             # two processes

The pass spec is the same either way: under torchrun ``ptool.transform`` finds the process group
itself. ``--model minilm`` is all-MiniLM-L6-v2 with its shipped weights on Python-manual text;
``--model tiny`` a seeded 2-layer BERT (hidden 32) on seeded random tokens, for tests. Rank 0
writes ``OUT`` (a ``torch.save`` dict: ``weights`` - every parameter of the converted attention
kernels by name; ``seconds`` - the ``transform`` call; ``processes``; ``notes`` - the pass's
notes); the other ranks write nothing and exit 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))


def tiny_model(rows: int, seq: int, batches: int):
    """A seeded 2-layer BERT sentence embedder and ``batches`` calibration batches of random tokens."""
    import torch
    from transformers import BertConfig, BertModel

    from ptool.default_model import SentenceEmbedder

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.3,
                        attn_implementation="eager")  # large weights: attention far from uniform
    model = SentenceEmbedder(BertModel(config)).eval()
    g = torch.Generator().manual_seed(1)
    calls = []
    for _ in range(batches):
        ids = torch.randint(1, 100, (rows, seq), generator=g)
        mask = torch.ones(rows, seq, dtype=torch.long)
        mask[0, seq // 2:] = 0  # one padded row, so masks matter
        calls.append((ids, mask))
    return model, calls


def minilm_model(rows: int, seq: int, batches: int):
    """all-MiniLM-L6-v2 and ``batches`` packed calibration batches of the Python manual."""
    from _minilm import calibration_batches

    from ptool.default_model import load_embedder

    return load_embedder().eval(), calibration_batches(seq, rows, batches)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", required=True, type=Path, help="where rank 0 saves the kernel weights")
    p.add_argument("--model", choices=("tiny", "minilm"), default="minilm")
    p.add_argument("--transfer-steps", type=int, default=8)
    p.add_argument("--distill-steps", type=int, default=8)
    p.add_argument("--distill-batch", type=int, default=2, help="calibration calls per distillation step")
    p.add_argument("--rows", type=int, default=8, help="rows per calibration batch")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batches", type=int, default=4, help="calibration batches")
    p.add_argument("--fail-rank", type=int, default=None, help="(tests) this rank fails once the others train")
    args = p.parse_args()

    import torch

    import ptool
    from ptool.distributed import world

    build = tiny_model if args.model == "tiny" else minilm_model
    model, calls = build(args.rows, args.seq, args.batches)
    spec = (f"linear-attention:feature_map=hedgehog,transfer_steps={args.transfer_steps},"
            f"distill_steps={args.distill_steps},distill_batch={args.distill_batch}")
    if args.fail_rank is not None and world().rank == args.fail_rank:
        raise RuntimeError(f"rank {args.fail_rank} failed on purpose (--fail-rank)")
    start = time.perf_counter()
    converted = ptool.transform(model, [spec], example_inputs=calls[0], calibration=calls, verify=False)
    seconds = time.perf_counter() - start
    here = world()
    if not here.writes:
        return 0
    weights = {name: t.detach().clone() for name, t in converted.graph_module.named_parameters()
               if name.startswith("ptool_attention")}
    notes = {k: v for r in converted.report for k, v in r.notes.items() if not isinstance(v, dict)}
    torch.save({"weights": weights, "seconds": seconds, "processes": here.size, "notes": notes}, args.output)
    print(f"{here.describe()}: converted in {seconds:.1f} s, {len(weights)} kernel tensors -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
