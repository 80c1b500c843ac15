"""Quantization passes: ``quantize`` (int8 static/dynamic, int4 weight-only), ``smooth-quant``,
``rotate`` and ``log-quant``, and the quantizer arithmetic they share (:mod:`.quantizers`)."""
