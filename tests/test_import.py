"""`import ptool` stays fast: no torch, ONNX Runtime, TVM or transformers at import time."""

import subprocess
import sys
import time


def test_import_is_light_and_fast():
    code = (
        "import sys, time; t = time.perf_counter(); import ptool, ptool.cli; dt = time.perf_counter() - t; "
        "heavy = [m for m in ('torch', 'onnxruntime', 'tvm', 'transformers', 'onnx') if m in sys.modules]; "
        "print(dt, ','.join(heavy))"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert time.perf_counter() - start < 10  # whole interpreter, generous for a loaded CI machine
    seconds, heavy = float(out[0]), (out[1] if len(out) > 1 else "")
    assert heavy == ""
    assert seconds < 2.0


def test_public_names_resolve_lazily():
    import ptool

    assert callable(ptool.transform) and callable(ptool.export_onnx) and callable(ptool.compile)
    assert issubclass(ptool.PassError, ValueError)
