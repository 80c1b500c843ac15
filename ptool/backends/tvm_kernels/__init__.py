"""Hand-written TIR kernels the TVM backend calls from Relax (``call_tir``).

Importing this package imports TVM (seconds); ``import ptool`` does not import it, only the TVM
backend does, when it builds a model that needs a kernel.

- :mod:`.shiftadd`: shift and additive kernels for ``shift-linear`` and ``binary-attention``.
- :mod:`.relax_ops`: the Relax lowering of the ``ptool_shift`` ops (``custom_convert_map``).
"""
