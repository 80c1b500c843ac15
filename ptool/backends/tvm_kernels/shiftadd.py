"""TIR kernels for the shift-add layers (TVM 0.27): shifts, selects and additions, no multiplies.

Each builder returns a scheduled ``tvm.tirx.PrimFunc`` computing one function of
:mod:`ptool.ops.shift_arith` bit for bit (int32 arithmetic; every partial sum fits int32
within the bounds arith.py states):

- :func:`matshift`: ``acc[m, n] = sum_k sum_t sign[t, n, k] * (x[m, k] << exp[t, n, k])`` from
  int8 ``x (M, K)`` and int8 codes stored **k-major**, ``(T, K, N)`` (the transpose of arith's
  ``(T, N, K)``, so the vectorized N axis reads contiguous memory). The term is
  ``select(sign == 1, x << e, select(sign == -1, 0 - (x << e), 0))``.
- :func:`matadd`: the ternary / binary case (``exp == 0``): ``select(sign == 1, x, -x or 0)``,
  no exponent stream at all.
- :func:`masked_accumulate`: ``kv[g, c, n] = sum_j h[g, j, c] * v[g, j, n]`` with ``h = +-1``
  read from packed int32 code words ``(G, J, W)`` and int8 ``v (G, J, N)``: add or subtract.
- :func:`sign_matmul`: ``out[g, i, n] = sum_c h[g, i, c] * w[g, c, n]``, codes on the output rows
  and an int32 right-hand side (the second product of binary attention, ``h_q @ kv``).
- :func:`code_dot`: ``bits - 2 * popcount(q xor k)`` summed over words (Hamming similarity).

Schedule (all kernels): rows tiled by ``rows_per_tile``, the N axis split into 16-lane int32
vectors (AVX-512) when N divides, accumulators in a local tile, the reduction outermost inside a
tile, the row/column tiles fused and run in parallel. On this machine that compiles the shift
term to ``vpsllvd`` + ``vpsubd`` + a masked move + ``vpaddd`` per 16 outputs (no ``vpmull``;
the tests check the assembly).

``M`` (rows / tokens) may be symbolic (``m=None``): the PrimFunc then takes any row count.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

VECTOR_LANES = 16
"""int32 lanes of one AVX-512 register."""

_INT32_ZERO = tirx.const(0, "int32")


@dataclass(frozen=True, kw_only=True)
class Tiling:
    """How a kernel's output is tiled: ``rows_per_tile`` x ``cols_per_tile`` accumulators.

    ``cols_per_tile`` is rounded down to whole 16-lane vectors dividing N (no vectorization when
    none does); ``rows_per_tile * cols_per_tile / 16`` vector accumulators should fit in the 32
    AVX-512 registers with room for temporaries.
    """

    rows_per_tile: int = 8
    cols_per_tile: int = 32

    def __post_init__(self) -> None:
        if self.rows_per_tile < 1 or self.cols_per_tile < 1:
            raise ValueError(f"tile sizes must be >= 1, got {self.rows_per_tile} x {self.cols_per_tile}")


DEFAULT_TILING = Tiling()


def _rows(m: int | None) -> int | tirx.Var:
    return tirx.Var("m", "int64") if m is None else m


def _cast32(value: tirx.PrimExpr) -> tirx.PrimExpr:
    return value.astype("int32")


def _signed(flag: tirx.PrimExpr, value: tirx.PrimExpr) -> tirx.PrimExpr:
    """``value`` where the code bit is set, ``0 - value`` where not (a select, not a multiply)."""
    return tirx.Select(flag, value, tirx.Sub(_INT32_ZERO, value))


def _ternary(sign: tirx.PrimExpr, value: tirx.PrimExpr) -> tirx.PrimExpr:
    """``sign * value`` for ``sign`` in {-1, 0, 1}, as two selects."""
    return tirx.Select(sign == 1, value, tirx.Select(sign == -1, tirx.Sub(_INT32_ZERO, value), _INT32_ZERO))


def _code_bit(words: te.Tensor, row_index: tuple, c: tirx.PrimExpr) -> tirx.PrimExpr:
    """Bit ``c`` of a packed code (little-endian int32 words, arith.pack_codes) as a bool."""
    word = words[(*row_index, c // 32)]
    return ((word >> (c % 32)) & 1) == 1


def _prim_func(*tensors: te.Tensor) -> tirx.PrimFunc:
    """A PrimFunc over ``tensors`` with int64 indices (Relax passes int64 shapes to ``call_tir``)."""
    return te.create_prim_func(list(tensors), index_dtype_override="int64")


def _vector_split(n: int, cols_per_tile: int) -> tuple[int, int] | None:
    """``(cols_per_tile, lanes)`` for an N axis of length ``n``, or None (leave it scalar)."""
    if n % VECTOR_LANES:
        return None
    cols = max(VECTOR_LANES, cols_per_tile // VECTOR_LANES * VECTOR_LANES)
    while n % cols:
        cols -= VECTOR_LANES
    return cols, VECTOR_LANES


def _schedule(func: tirx.PrimFunc, block: str, n: int, tiling: Tiling, batched: bool) -> tirx.PrimFunc:
    """Tile rows x columns, keep the accumulator tile local, vectorize N, parallelize the tiles.

    The block's loops must be ``[g,] i, n, <reductions...>``.
    """
    sch = Schedule(func)
    blk = sch.get_sblock(block)
    loops = sch.get_loops(blk)
    outer_batch = loops[:1] if batched else []
    i, j, *reductions = loops[len(outer_batch):]
    i_outer, i_inner = sch.split(i, [None, tiling.rows_per_tile])
    vector = _vector_split(n, tiling.cols_per_tile)
    if vector is None:
        j_outer, j_inner = sch.split(j, [None, min(n, tiling.cols_per_tile)])
        lanes: list = []
        sch.reorder(*outer_batch, i_outer, j_outer, *reductions, i_inner, j_inner)
    else:
        cols, width = vector
        j_outer, j_rest = sch.split(j, [None, cols])
        j_vec_outer, j_lanes = sch.split(j_rest, [None, width])
        lanes = [j_vec_outer, j_lanes]
        sch.reorder(*outer_batch, i_outer, j_outer, *reductions, i_inner, j_vec_outer, j_lanes)
    tile = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(tile, j_outer)
    if lanes:
        sch.vectorize(lanes[1])
        sch.unroll(lanes[0])
        sch.unroll(i_inner)
        tile_loops = sch.get_loops(tile)
        sch.vectorize(sch.split(tile_loops[-1], [None, VECTOR_LANES])[1])
    for loop in reductions[1:]:  # the term axis (T <= 2): unrolled
        sch.unroll(loop)
    sch.parallel(sch.fuse(*outer_batch, i_outer, j_outer))
    sch.decompose_reduction(blk, reductions[0])
    return sch.mod["main"]


def matshift(m: int | None, n: int, k: int, terms: int, tiling: Tiling = DEFAULT_TILING) -> tirx.PrimFunc:
    """``(x int8 (M, K), sign int8 (T, K, N), exp int8 (T, K, N)) -> acc int32 (M, N)``.

    Args:
        m: rows, or None for a symbolic row count.
        n, k: output and input features.
        terms: T, power-of-two terms per weight (1 or 2).
    """
    _check_terms(terms)
    x = te.placeholder((_rows(m), k), "int8", "x")
    sign = te.placeholder((terms, k, n), "int8", "sign")
    exp = te.placeholder((terms, k, n), "int8", "exp")
    kk = te.reduce_axis((0, k), "k")
    tt = te.reduce_axis((0, terms), "t")

    def term(i, j):
        shifted = _cast32(x[i, kk]) << _cast32(exp[tt, kk, j])
        return _ternary(sign[tt, kk, j], shifted)

    acc = te.compute((x.shape[0], n), lambda i, j: te.sum(term(i, j), axis=[kk, tt]), name="acc")
    return _schedule(_prim_func(x, sign, exp, acc), "acc", n, tiling, batched=False)


def matadd(m: int | None, n: int, k: int, terms: int, tiling: Tiling = DEFAULT_TILING) -> tirx.PrimFunc:
    """The ``exp == 0`` case of :func:`matshift`: ``(x (M, K), sign (T, K, N)) -> int32 (M, N)``."""
    _check_terms(terms)
    x = te.placeholder((_rows(m), k), "int8", "x")
    sign = te.placeholder((terms, k, n), "int8", "sign")
    kk = te.reduce_axis((0, k), "k")
    tt = te.reduce_axis((0, terms), "t")
    acc = te.compute(
        (x.shape[0], n),
        lambda i, j: te.sum(_ternary(sign[tt, kk, j], _cast32(x[i, kk])), axis=[kk, tt]),
        name="acc",
    )
    return _schedule(_prim_func(x, sign, acc), "acc", n, tiling, batched=False)


def matmul(m: int | None, n: int, k: int, dtype: str = "float32", tiling: Tiling = DEFAULT_TILING) -> tirx.PrimFunc:
    """The multiply baseline with the same schedule: ``(x (M, K), w (K, N)) -> (M, N)``.

    ``dtype`` ``float32`` gives float32; ``int8`` gives int8 inputs and an int32 accumulator.
    For benchmarks: it is what the shift and additive kernels replace.
    """
    if dtype not in ("float32", "int8"):
        raise ValueError(f"dtype must be 'float32' or 'int8', got {dtype!r}")
    acc_dtype = "float32" if dtype == "float32" else "int32"
    x = te.placeholder((_rows(m), k), dtype, "x")
    w = te.placeholder((k, n), dtype, "w")
    kk = te.reduce_axis((0, k), "k")
    acc = te.compute((x.shape[0], n), lambda i, j: te.sum(x[i, kk].astype(acc_dtype) * w[kk, j].astype(acc_dtype),
                                                          axis=kk), name="acc")
    return _schedule(_prim_func(x, w, acc), "acc", n, tiling, batched=False)


def masked_accumulate(groups: int | None, j: int | None, n: int, bits: int,
                      tiling: Tiling = DEFAULT_TILING) -> tirx.PrimFunc:
    """``(codes int32 (G, J, W), v int8 (G, J, N)) -> kv int32 (G, bits, N)``, ``W = ceil(bits/32)``.

    ``kv[g, c, n] = sum_j (bit c of codes[g, j] ? v : -v)[g, j, n]``. ``groups`` and ``j`` may be
    None (symbolic).
    """
    g_dim = tirx.Var("g", "int64") if groups is None else groups
    j_dim = tirx.Var("j", "int64") if j is None else j
    codes = te.placeholder((g_dim, j_dim, _words(bits)), "int32", "codes")
    v = te.placeholder((g_dim, j_dim, n), "int8", "v")
    jj = te.reduce_axis((0, j_dim), "j")
    kv = te.compute(
        (g_dim, bits, n),
        lambda g, c, col: te.sum(_signed(_code_bit(codes, (g, jj), c), _cast32(v[g, jj, col])), axis=jj),
        name="kv",
    )
    return _schedule(_prim_func(codes, v, kv), "kv", n, tiling, batched=True)


def sign_matmul(groups: int | None, m: int | None, n: int, bits: int,
                tiling: Tiling = DEFAULT_TILING) -> tirx.PrimFunc:
    """``(codes int32 (G, M, W), w int32 (G, bits, N)) -> int32 (G, M, N)``: ``sum_c h[i, c] w[c, n]``."""
    g_dim = tirx.Var("g", "int64") if groups is None else groups
    codes = te.placeholder((g_dim, _rows(m), _words(bits)), "int32", "codes")
    w = te.placeholder((g_dim, bits, n), "int32", "w")
    cc = te.reduce_axis((0, bits), "c")
    out = te.compute(
        (g_dim, codes.shape[1], n),
        lambda g, i, col: te.sum(_signed(_code_bit(codes, (g, i), cc), w[g, cc, col]), axis=cc),
        name="out",
    )
    return _schedule(_prim_func(codes, w, out), "out", n, tiling, batched=True)


def code_dot(groups: int | None, m: int | None, n: int, bits: int,
             tiling: Tiling = DEFAULT_TILING) -> tirx.PrimFunc:
    """``(q int32 (G, M, W), k int32 (G, N, W)) -> int32 (G, M, N)``: ``bits - 2 * popcount(q ^ k)``.

    Written as one sum over words of ``bits_in_word - (popcount << 1)`` (the doubling is a shift);
    the popcount is TIR's ``popcount`` intrinsic (``vpopcntd`` on AVX-512 VPOPCNTDQ).
    """
    g_dim = tirx.Var("g", "int64") if groups is None else groups
    words = _words(bits)
    last_word_bits = bits - 32 * (words - 1)
    q = te.placeholder((g_dim, _rows(m), words), "int32", "q")
    k = te.placeholder((g_dim, n, words), "int32", "k")
    ww = te.reduce_axis((0, words), "w")

    def word_dot(g, i, col):
        in_word = tirx.Select(ww == words - 1, tirx.const(last_word_bits, "int32"), tirx.const(32, "int32"))
        return in_word - (tirx.popcount(tirx.bitwise_xor(q[g, i, ww], k[g, col, ww])) << 1)

    out = te.compute((g_dim, q.shape[1], n), lambda g, i, col: te.sum(word_dot(g, i, col), axis=ww), name="out")
    return _schedule(_prim_func(q, k, out), "out", n, tiling, batched=True)


def _words(bits: int) -> int:
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    return (bits + 31) // 32


def _check_terms(terms: int) -> None:
    if terms not in (1, 2):
        raise ValueError(f"terms must be 1 or 2 (power-of-two terms per weight), got {terms}")


def compile_kernel(func: tirx.PrimFunc, target: object | None = None) -> tvm.runtime.Module:
    """Build one PrimFunc for the host CPU (or ``target``); call it with ``tvm.runtime.Tensor`` s."""
    from ptool.backends.tvm_host import host_target

    return tvm.compile(func, target=target or host_target())
