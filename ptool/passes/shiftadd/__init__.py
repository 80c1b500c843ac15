"""Shift-add (multiplication-free) passes: ``shift-linear`` (power-of-two / ternary / binary weights)
and ``binary-attention`` (Hamming codes, additive kernels); :mod:`.arith` defines their integer
arithmetic, which every backend matches bit for bit."""
