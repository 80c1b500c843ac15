"""The embedded default: all-MiniLM-L6-v2 (real weights) on real sentences -> ONNX Runtime.

Transforms the sentence embedder with the exact cleanup pipeline, exports ONNX, and checks that
the ONNX Runtime embeddings of held-out sentences match torch (cosine) while timing both.

    python examples/minilm_onnxruntime.py
"""

import tempfile
from pathlib import Path

import torch

import ptool
from ptool.benchmark import measure
from ptool.default_model import default_model


def main() -> None:
    model, args, kwargs, calibration, heldout = default_model(seq_len=128, batch_size=1)
    m2 = ptool.transform(model, ["dce", "cse", "constant-fold", "fold-bn"], args, example_kwargs=kwargs)
    print(m2.report)
    with tempfile.TemporaryDirectory() as tmp:
        ptool.export_onnx(m2, Path(tmp) / "minilm.onnx")
        run = ptool.compile(m2, backend="onnxruntime", onnx_path=str(Path(tmp) / "minilm_ort.onnx"))
        cosines = []
        with torch.no_grad():
            for batch in heldout[:8]:  # positional (input_ids, attention_mask) tuples
                ref, out = model(*batch), run(*batch)
                cosines.append(torch.nn.functional.cosine_similarity(ref, out, dim=-1).min().item())
        print(f"held-out sentences: min embedding cosine torch vs ONNX Runtime = {min(cosines):.6f}")
        t_torch = measure(model, args, kwargs)
        t_ort = measure(run, args, kwargs)
        print(f"torch eager {t_torch.median_ms:.2f} ms, ONNX Runtime {t_ort.median_ms:.2f} ms "
              f"({t_torch.median_ms / t_ort.median_ms:.2f}x)")


if __name__ == "__main__":
    main()
