"""Chapter 02: a cycle-level systolic-array simulator, its closed-form cycle model, pictures.

A systolic array is a grid of ``rows x cols`` processing elements (PEs). In every cycle
each PE does at most one multiply-accumulate (MAC) and passes its operands to its
neighbours: values in the horizontal registers move one PE to the right, values in the
vertical registers one PE down. Operands are read from memory once, at the array's
edge, and then reused as they travel through the grid.

Three dataflows, named after the operand that stays in place (``a`` is M x K, ``b`` is
K x N, the output a @ b is M x N; the array has R = rows and C = cols):

``"os"`` output-stationary
    An R x C tile of the output stays, one element per PE (M over rows, N over cols).
    Rows of ``a`` stream in from the left and columns of ``b`` from the top, both
    skewed by one cycle per row/column, so PE(i, j) does its k-th MAC at cycle
    i + j + k. Cycles per fold: R + C + K - 2. Folds: ceil(M/R) * ceil(N/C).

``"ws"`` weight-stationary (the TPU's MXU)
    An R x C tile of ``b`` (K over rows, N over cols) is preloaded, one row per cycle
    (R cycles). Rows of ``a`` stream in from the left, skewed; partial sums flow down
    and leave at the bottom. PE(k, j) does the MAC for input row m at cycle
    R + m + k + j. Cycles per fold: M + 2R + C - 2. Folds: ceil(K/R) * ceil(N/C);
    the partial sums of different K-folds add into the output.

``"is"`` input-stationary
    An R x C tile of ``a`` transposed (K over rows, M over cols) is preloaded (R cycles);
    columns of ``b`` stream in from the left (N over time). Cycles per fold:
    N + 2R + C - 2. Folds: ceil(K/R) * ceil(M/C).

Cycle conventions (the same in :func:`simulate`, :func:`reference_simulate` and
:func:`cycle_count`): a fold's cycles are counted from the first operand entering the
array to the last MAC, skew and fill included; there is no separate output drain. The
stationary dataflows pay R cycles per fold to preload the stationary operand (no double
buffering). The whole physical array is charged even when a fold uses only part of it,
so every fold of one GEMM costs the same number of cycles, and folds run one after
another. These counts are directly comparable with SCALE-Sim's (Samajdar et al. 2018),
which reports one less: the 0-based index of the last cycle, e.g. 2*Sr + Sc + T - 2 for
the stationary dataflows.

The simulator advances the whole array (and several folds side by side) one cycle at a
time with NumPy array operations; :func:`reference_simulate` runs the same schedule with
a Python loop over PEs and serves as the speed baseline and a second check.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from scalelab import bench, env, plot

DATAFLOWS = ("os", "ws", "is")
DATAFLOW_NAMES = {"os": "output-stationary", "ws": "weight-stationary", "is": "input-stationary"}
DEFAULT_TRACE_LIMIT = 256  # cycles recorded when trace=True
MAX_TRACE_VALUES = 4_000_000  # trace_limit * rows * cols may not exceed this (bounded memory)
BATCH_VALUES = 1 << 18  # folds simulated side by side hold about this many PE registers


# --------------------------------------------------------------------------- validation


def _check_dataflow(dataflow: Any) -> str:
    names = {v: k for k, v in DATAFLOW_NAMES.items()}
    key = dataflow.lower() if isinstance(dataflow, str) else None
    key = names.get(key, key)
    if key not in DATAFLOWS:
        raise ValueError(
            f"unknown dataflow {dataflow!r}; expected one of 'os' (output-stationary), "
            "'ws' (weight-stationary), 'is' (input-stationary)"
        )
    return key


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _check_shape(M: Any, K: Any, N: Any, rows: Any, cols: Any) -> tuple[int, ...]:
    return tuple(
        _check_positive_int(name, v)
        for name, v in (("M", M), ("K", K), ("N", N), ("rows", rows), ("cols", cols))
    )


def _is_extension_float(dtype: np.dtype) -> bool:
    """bfloat16 / float8 from ml_dtypes (what ``np.asarray`` makes of such JAX arrays)."""
    return dtype.kind == "V" and "float" in dtype.name


def _check_operands(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray, np.dtype, np.dtype]:
    """Validate a (M x K) and b (K x N); return them with the output and accumulator dtypes."""
    mats = []
    for name, x in (("a", a), ("b", b)):
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{name} is not a numeric matrix: {err}") from None
        if arr.ndim != 2:
            raise ValueError(f"{name} must be a 2-D matrix, got a {arr.ndim}-D array of shape {arr.shape}")
        if _is_extension_float(arr.dtype):
            arr = arr.astype(np.float32)
        if arr.dtype.kind not in "iufc":
            raise ValueError(
                f"{name} must hold numbers (integer, floating or complex dtype), "
                f"got dtype {arr.dtype}"
            )
        if 0 in arr.shape:
            raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
        mats.append(arr)
    a, b = mats
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"inner dimensions do not match: a is {a.shape[0]}x{a.shape[1]} "
            f"but b is {b.shape[0]}x{b.shape[1]}"
        )
    out_dtype = np.result_type(a.dtype, b.dtype)
    kind = out_dtype.kind
    acc = np.dtype(np.complex128 if kind == "c" else np.float64 if kind == "f" else np.int64)
    return a.astype(acc, copy=False), b.astype(acc, copy=False), out_dtype, acc


# --------------------------------------------------------------------------- closed form


def fold_count(M: int, K: int, N: int, rows: int, cols: int, dataflow: str) -> int:
    """How many times the array is (re)filled to compute an M x K by K x N product."""
    M, K, N, R, C = _check_shape(M, K, N, rows, cols)
    df = _check_dataflow(dataflow)
    if df == "os":
        return math.ceil(M / R) * math.ceil(N / C)
    if df == "ws":
        return math.ceil(K / R) * math.ceil(N / C)
    return math.ceil(K / R) * math.ceil(M / C)


def cycles_per_fold(M: int, K: int, N: int, rows: int, cols: int, dataflow: str) -> int:
    """Cycles of one fold: R+C+K-2 (OS), M+2R+C-2 (WS), N+2R+C-2 (IS)."""
    M, K, N, R, C = _check_shape(M, K, N, rows, cols)
    df = _check_dataflow(dataflow)
    if df == "os":
        return R + C + K - 2
    return (M if df == "ws" else N) + 2 * R + C - 2


def cycle_count(M: int, K: int, N: int, rows: int, cols: int, dataflow: str) -> int:
    """Closed-form cycles of the whole GEMM: folds x cycles per fold (see the module doc)."""
    return fold_count(M, K, N, rows, cols, dataflow) * cycles_per_fold(
        M, K, N, rows, cols, dataflow
    )


def utilization(M: int, K: int, N: int, rows: int, cols: int, dataflow: str) -> float:
    """Fraction of PE-cycles doing a useful MAC: M*K*N / (cycles * rows * cols)."""
    return M * K * N / (cycle_count(M, K, N, rows, cols, dataflow) * rows * cols)


# --------------------------------------------------------------------------- memory traffic


@dataclasses.dataclass(frozen=True)
class MemoryTraffic:
    """Element reads from memory for one GEMM: systolic schedule vs a scalar MAC loop.

    The scalar loop (``for m, n, k: c[m, n] += a[m, k] * b[k, n]``) reads two operands
    per MAC and reads/writes the accumulator (kept in a register here, so not counted):
    ``2*M*K*N`` operand reads. The systolic array reads each operand element once per
    fold that needs it, at the array's edge, and passes it from PE to PE. Stationary
    dataflows with several K-folds also read back partial sums to add the next fold's.
    """

    M: int
    K: int
    N: int
    rows: int
    cols: int
    dataflow: str
    scalar_operand_reads: int
    systolic_operand_reads: int
    systolic_partial_sum_reads: int

    @property
    def macs(self) -> int:
        return self.M * self.K * self.N

    @property
    def systolic_reads(self) -> int:
        """Operand plus partial-sum reads of the systolic schedule."""
        return self.systolic_operand_reads + self.systolic_partial_sum_reads

    @property
    def reduction(self) -> float:
        """How many times fewer reads the systolic schedule makes than the scalar loop."""
        return self.scalar_operand_reads / self.systolic_reads

    def row(self) -> dict[str, Any]:
        return {
            "GEMM M x K x N": f"{self.M} x {self.K} x {self.N}",
            "array": f"{self.rows} x {self.cols} {self.dataflow.upper()}",
            "MACs": f"{self.macs:,}",
            "scalar loop reads": f"{self.scalar_operand_reads:,}",
            "systolic reads": f"{self.systolic_reads:,}",
            "reads per MAC (systolic)": round(self.systolic_reads / self.macs, 4),
            "fewer reads": f"{self.reduction:,.1f}x",
        }


def memory_traffic(M: int, K: int, N: int, rows: int, cols: int, dataflow: str) -> MemoryTraffic:
    """Operand reads of the systolic schedule vs a scalar MAC loop (see :class:`MemoryTraffic`)."""
    M, K, N, R, C = _check_shape(M, K, N, rows, cols)
    df = _check_dataflow(dataflow)
    if df == "os":  # a tile row-block is re-read for every column fold and vice versa
        reads = M * K * math.ceil(N / C) + K * N * math.ceil(M / R)
        psums = 0
    elif df == "ws":  # b read once (preload); a re-read for every column fold of b
        reads = K * N + M * K * math.ceil(N / C)
        psums = M * N * (math.ceil(K / R) - 1)
    else:  # a read once (preload); b re-read for every column fold of a
        reads = M * K + K * N * math.ceil(M / C)
        psums = M * N * (math.ceil(K / R) - 1)
    return MemoryTraffic(M, K, N, R, C, df, 2 * M * K * N, reads, psums)


# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class Trace:
    """Per-cycle state of the array for the first ``len(trace)`` cycles of a simulation.

    Arrays are indexed ``[cycle, row, col]``. ``a`` and ``b`` hold the element of ``a``
    and of ``b`` in each PE's register after that cycle's shift (``a_valid``/``b_valid``
    say whether the register holds one; empty registers read 0). In OS both move; in WS
    ``b`` is the stationary weight; in IS ``a`` is stationary. ``acc`` is the partial sum
    each PE holds (OS) or passes down (WS, IS) after the cycle; ``active`` marks the PEs
    that did a MAC. ``loading`` marks preload cycles of the stationary operand.
    """

    dataflow: str
    rows: int
    cols: int
    total_cycles: int
    cycle: np.ndarray
    fold: np.ndarray
    loading: np.ndarray
    active: np.ndarray
    a: np.ndarray
    a_valid: np.ndarray
    b: np.ndarray
    b_valid: np.ndarray
    acc: np.ndarray

    def __len__(self) -> int:
        return len(self.cycle)

    @property
    def truncated(self) -> bool:
        """True when the run had more cycles than were recorded."""
        return len(self) < self.total_cycles

    @property
    def active_count(self) -> np.ndarray:
        """Number of PEs doing a MAC in each recorded cycle."""
        return self.active.sum(axis=(1, 2))

    @property
    def nbytes(self) -> int:
        return sum(
            getattr(self, f.name).nbytes
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), np.ndarray)
        )


@dataclasses.dataclass(frozen=True)
class SystolicResult:
    """What a simulation produced: the product, its cycle count and how busy the PEs were."""

    output: np.ndarray
    cycles: int
    macs: int
    utilization: float
    folds: int
    cycles_per_fold: int
    operand_reads: int  # operand elements that entered the array from memory
    dataflow: str
    rows: int
    cols: int
    shape: tuple[int, int, int]  # (M, K, N)
    trace: Trace | None = None

    def row(self) -> dict[str, Any]:
        M, K, N = self.shape
        return {
            "GEMM M x K x N": f"{M} x {K} x {N}",
            "array": f"{self.rows} x {self.cols}",
            "dataflow": self.dataflow.upper(),
            "folds": self.folds,
            "cycles/fold": self.cycles_per_fold,
            "cycles": self.cycles,
            "MACs": self.macs,
            "utilisation": round(self.utilization, 4),
        }


class _Recorder:
    """Copies the array state of the first ``limit`` global cycles into a :class:`Trace`."""

    def __init__(self, dataflow: str, rows: int, cols: int, total: int, limit: int, dtype: Any):
        n = min(total, limit)
        self.dataflow, self.rows, self.cols, self.total, self.n = dataflow, rows, cols, total, n
        shape = (n, rows, cols)
        self.fold = np.zeros(n, dtype=np.int64)
        self.loading = np.zeros(n, dtype=bool)
        self.active = np.zeros(shape, dtype=bool)
        self.a_valid = np.zeros(shape, dtype=bool)
        self.b_valid = np.zeros(shape, dtype=bool)
        self.a = np.zeros(shape, dtype=dtype)
        self.b = np.zeros(shape, dtype=dtype)
        self.acc = np.zeros(shape, dtype=dtype)

    def wants(self, folds: np.ndarray, per_fold: int) -> bool:
        return bool(folds.size) and int(folds[0]) * per_fold < self.n

    def record(self, folds: np.ndarray, per_fold: int, t: int, loading: bool,
               active: np.ndarray, a: np.ndarray, a_valid: np.ndarray,
               b: np.ndarray, b_valid: np.ndarray, acc: np.ndarray) -> None:
        glob = folds * per_fold + t
        sel = glob < self.n
        if not sel.any():
            return
        idx = glob[sel]
        self.fold[idx] = folds[sel]
        self.loading[idx] = loading
        for name, value in (("active", active), ("a", a), ("a_valid", a_valid),
                            ("b", b), ("b_valid", b_valid), ("acc", acc)):
            getattr(self, name)[idx] = value[sel]

    def finish(self) -> Trace:
        return Trace(self.dataflow, self.rows, self.cols, self.total,
                     np.arange(self.n), self.fold, self.loading, self.active,
                     self.a, self.a_valid, self.b, self.b_valid, self.acc)


# --------------------------------------------------------------------------- vectorised core


def _batch(folds: int, rows: int, cols: int) -> int:
    return max(1, min(folds, BATCH_VALUES // (rows * cols)))


def _shift(new: np.ndarray, old: np.ndarray, axis: int) -> None:
    """new = old moved one PE along ``axis`` (1: down, 2: right); the edge is set by the caller."""
    if axis == 2:
        np.copyto(new[:, :, 1:], old[:, :, :-1])
    else:
        np.copyto(new[:, 1:, :], old[:, :-1, :])


def _run_os(a: np.ndarray, b: np.ndarray, R: int, C: int, rec: _Recorder | None,
            masked: bool) -> tuple[np.ndarray, int, int]:
    """Output-stationary: returns (a @ b, MACs done, operand reads). See :func:`simulate`
    for ``masked``."""
    M, K = a.shape
    N = b.shape[1]
    MF, NF = math.ceil(M / R), math.ceil(N / C)
    per_fold = R + C + K - 2
    a_pad = np.zeros((MF * R, K), a.dtype)
    a_pad[:M] = a
    b_pad = np.zeros((K, NF * C), b.dtype)
    b_pad[:, :N] = b
    row_ok, col_ok = np.arange(MF * R) < M, np.arange(NF * C) < N
    out = np.zeros((MF * R, NF * C), a.dtype)
    ii, jj = np.arange(R), np.arange(C)
    macs = reads = 0
    F = MF * NF
    G = _batch(F, R, C)
    for start in range(0, F, G):
        folds = np.arange(start, min(start + G, F))
        g = len(folds)
        arow = (folds // NF)[:, None] * R + ii  # (g, R): the row of a fed to each array row
        bcol = (folds % NF)[:, None] * C + jj  # (g, C): the column of b fed to each array col
        a_ok, b_ok = row_ok[arow], col_ok[bcol]
        regs = [np.zeros((g, R, C), a.dtype) for _ in range(4)]  # a, a', b, b'
        val = [np.zeros((g, R, C), bool) for _ in range(4)]
        acc = np.zeros((g, R, C), a.dtype)
        prod = np.zeros((g, R, C), a.dtype)
        active = np.zeros((g, R, C), bool)
        trace = rec is not None and rec.wants(folds, per_fold)
        for t in range(per_fold):
            a_new, a_old, b_new, b_old = regs[1], regs[0], regs[3], regs[2]
            av_new, av_old, bv_new, bv_old = val[1], val[0], val[3], val[2]
            # operands move one PE right (a) and one PE down (b) ...
            _shift(a_new, a_old, 2)
            _shift(av_new, av_old, 2)
            _shift(b_new, b_old, 1)
            _shift(bv_new, bv_old, 1)
            # ... and new ones enter at the edges, skewed: row i gets a[., t - i]
            ka, kb = t - ii, t - jj
            oka = (ka >= 0) & (ka < K) & a_ok
            okb = (kb >= 0) & (kb < K) & b_ok
            av_new[:, :, 0] = oka
            a_new[:, :, 0] = np.where(oka, a_pad[arow, np.clip(ka, 0, K - 1)], 0)
            bv_new[:, 0, :] = okb
            b_new[:, 0, :] = np.where(okb, b_pad[np.clip(kb, 0, K - 1), bcol], 0)
            reads += int(oka.sum() + okb.sum())
            # every PE holding two operands does one multiply-accumulate
            np.logical_and(av_new, bv_new, out=active)
            if masked:  # idle PEs do nothing (no inf * 0)
                np.multiply(a_new, b_new, out=prod, where=active)
                np.add(acc, prod, out=acc, where=active)
            else:  # empty registers hold 0: an idle PE's product is exactly 0
                np.multiply(a_new, b_new, out=prod)
                np.add(acc, prod, out=acc)
            macs += int(np.count_nonzero(active))
            regs = [a_new, a_old, b_new, b_old]
            val = [av_new, av_old, bv_new, bv_old]
            if trace:
                rec.record(folds, per_fold, t, False, active, a_new, av_new, b_new, bv_new, acc)
        out[arow[:, :, None], bcol[:, None, :]] = acc  # each OS fold owns its output tile
    return out[:M, :N], macs, reads


def _record_stationary(rec: Any, stationary_is_a: bool, folds: np.ndarray, per_fold: int,
                       t: int, loading: bool, active: np.ndarray, st: np.ndarray,
                       st_ok: np.ndarray, x: np.ndarray, x_ok: np.ndarray, acc: np.ndarray) -> None:
    if stationary_is_a:  # IS: a is stationary, b streams
        rec.record(folds, per_fold, t, loading, active, st, st_ok, x, x_ok, acc)
    else:  # WS: a streams, b is stationary
        rec.record(folds, per_fold, t, loading, active, x, x_ok, st, st_ok, acc)


def _run_stationary(x: np.ndarray, s: np.ndarray, R: int, C: int, rec: _Recorder | None,
                    stationary_is_a: bool, masked: bool) -> tuple[np.ndarray, int, int]:
    """x (T x K) @ s (K x P) with tiles of s preloaded (K over rows, P over cols).

    WS calls it with x = a, s = b; IS with x = b.T, s = a.T. Returns (x @ s, MACs, reads).
    """
    T, K = x.shape
    P = s.shape[1]
    KF, PF = math.ceil(K / R), math.ceil(P / C)
    per_fold = T + 2 * R + C - 2
    s_pad = np.zeros((KF * R, PF * C), s.dtype)
    s_pad[:K, :P] = s
    x_pad = np.zeros((T, KF * R), x.dtype)
    x_pad[:, :K] = x
    k_ok, p_ok = np.arange(KF * R) < K, np.arange(PF * C) < P
    out = np.zeros((T, PF * C), x.dtype)
    ii, jj = np.arange(R), np.arange(C)
    macs = reads = 0
    F = KF * PF
    G = _batch(F, R, C)
    for start in range(0, F, G):
        folds = np.arange(start, min(start + G, F))  # fold f = (p-fold f // KF, k-fold f % KF)
        g = len(folds)
        krow = (folds % KF)[:, None] * R + ii  # (g, R)
        pcol = (folds // KF)[:, None] * C + jj  # (g, C)
        s_tile = s_pad[krow[:, :, None], pcol[:, None, :]]  # (g, R, C)
        s_tile_ok = k_ok[krow][:, :, None] & p_ok[pcol][:, None, :]
        x_ok = k_ok[krow]  # (g, R)
        st, st_ok = np.zeros((g, R, C), s.dtype), np.zeros((g, R, C), bool)
        xs = [np.zeros((g, R, C), x.dtype) for _ in range(2)]
        xv = [np.zeros((g, R, C), bool) for _ in range(2)]
        ps = [np.zeros((g, R, C), x.dtype) for _ in range(2)]
        prod = np.zeros((g, R, C), x.dtype)
        active = np.zeros((g, R, C), bool)
        trace = rec is not None and rec.wants(folds, per_fold)

        # preload: the stationary tile shifts down one row per cycle, last row first
        for t in range(R):
            _shift(st, st.copy(), 1)
            _shift(st_ok, st_ok.copy(), 1)
            st[:, 0, :] = s_tile[:, R - 1 - t, :]
            st_ok[:, 0, :] = s_tile_ok[:, R - 1 - t, :]
            reads += int(st_ok[:, 0, :].sum())
            if trace:
                _record_stationary(rec, stationary_is_a, folds, per_fold, t, True, active,
                                   st, st_ok, xs[0], xv[0], ps[0])
        bottom_m = -(R - 1) - jj  # psum leaving PE(R-1, j) at stream cycle u belongs to row u + this
        for t in range(R, per_fold):
            u = t - R  # cycles since streaming began
            x_new, x_old, xv_new, xv_old = xs[1], xs[0], xv[1], xv[0]
            _shift(x_new, x_old, 2)
            _shift(xv_new, xv_old, 2)
            m = u - ii  # row of x entering array row k (skew by one cycle per row)
            ok = (m >= 0) & (m < T) & x_ok
            xv_new[:, :, 0] = ok
            x_new[:, :, 0] = np.where(ok, x_pad[np.clip(m, 0, T - 1), krow], 0)
            reads += int(ok.sum())
            # partial sums move one PE down; each active PE adds its product
            p_new, p_old = ps[1], ps[0]
            np.logical_and(xv_new, st_ok, out=active)
            if masked:
                np.multiply(x_new, st, out=prod, where=active)
                _shift(p_new, p_old, 1)
                p_new[:, 0, :] = 0
                np.add(p_new, prod, out=p_new, where=active)
            else:  # the same sum, with the shift fused into the add (prod is 0 where idle)
                np.multiply(x_new, st, out=prod)
                np.add(p_old[:, :-1, :], prod[:, 1:, :], out=p_new[:, 1:, :])
                p_new[:, 0, :] = prod[:, 0, :]
            macs += int(np.count_nonzero(active))
            # a finished column sum leaves the bottom row: x row (u - (R-1) - j), column j
            mb = u + bottom_m
            done = (mb >= 0) & (mb < T)
            if done.any():
                cols = pcol[:, done]
                np.add.at(out, (np.broadcast_to(mb[done], cols.shape), cols), p_new[:, R - 1, done])
            xs, xv, ps = [x_new, x_old], [xv_new, xv_old], [p_new, p_old]
            if trace:
                _record_stationary(rec, stationary_is_a, folds, per_fold, t, False, active,
                                   st, st_ok, x_new, xv_new, p_new)
    return out[:, :P], macs, reads


def simulate(a: Any, b: Any, rows: int, cols: int, dataflow: str = "os", *,
             trace: bool = False, trace_limit: int = DEFAULT_TRACE_LIMIT) -> SystolicResult:
    """Cycle-level simulation of ``a @ b`` on a ``rows x cols`` systolic array.

    ``a`` is M x K and ``b`` K x N, any sizes (larger GEMMs run as several folds, one
    after another). Accumulation is in float64 (complex128, or int64 for integers, which
    are exact); ``output`` has the dtype of ``a @ b``. With ``trace=True`` the state of
    every PE is recorded for the first ``trace_limit`` cycles; ``trace_limit * rows *
    cols`` may not exceed :data:`MAX_TRACE_VALUES`, which keeps the trace's memory bounded.
    Raises ValueError for bad operands, array sizes or dataflow.
    """
    a, b, out_dtype, acc = _check_operands(a, b)
    M, K = a.shape
    N = b.shape[1]
    M, K, N, R, C = _check_shape(M, K, N, rows, cols)
    df = _check_dataflow(dataflow)
    folds = fold_count(M, K, N, R, C, df)
    per_fold = cycles_per_fold(M, K, N, R, C, df)
    total = folds * per_fold
    rec = None
    if trace:
        limit = _check_positive_int("trace_limit", trace_limit)
        values = min(limit, total) * R * C
        if values > MAX_TRACE_VALUES:
            raise ValueError(
                f"a trace of {min(limit, total):,} cycles on a {R}x{C} array would hold "
                f"{values:,} values per quantity (limit {MAX_TRACE_VALUES:,}); "
                "lower trace_limit or trace a smaller array"
            )
        rec = _Recorder(df, R, C, total, limit, acc)
    # Empty registers hold 0, so with finite operands an idle PE's product is exactly 0
    # and the activity mask can be skipped in the add; inf/nan operands need the mask.
    masked = not (np.isfinite(a).all() and np.isfinite(b).all())
    if df == "os":
        out, macs, reads = _run_os(a, b, R, C, rec, masked)
    elif df == "ws":
        out, macs, reads = _run_stationary(a, b, R, C, rec, False, masked)
    else:
        out_t, macs, reads = _run_stationary(b.T, a.T, R, C, rec, True, masked)
        out = out_t.T
    return SystolicResult(
        output=out.astype(out_dtype, copy=False), cycles=total, macs=macs,
        utilization=macs / (total * R * C), folds=folds, cycles_per_fold=per_fold,
        operand_reads=reads, dataflow=df, rows=R, cols=C, shape=(M, K, N),
        trace=rec.finish() if rec is not None else None,
    )


# --------------------------------------------------------------------------- reference loop


def _ref_os(A: list, B: list, M: int, K: int, N: int, R: int, C: int, out: list) -> tuple[int, int]:
    macs = reads = 0
    for mf in range(math.ceil(M / R)):
        for nf in range(math.ceil(N / C)):
            a_reg: list[list[Any]] = [[None] * C for _ in range(R)]  # None: empty register
            b_reg: list[list[Any]] = [[None] * C for _ in range(R)]
            acc = [[0] * C for _ in range(R)]
            for t in range(R + C + K - 2):
                for i in range(R):  # a moves right; row i receives a[mf*R + i, t - i]
                    for j in range(C - 1, 0, -1):
                        a_reg[i][j] = a_reg[i][j - 1]
                    m, k = mf * R + i, t - i
                    a_reg[i][0] = A[m][k] if m < M and 0 <= k < K else None
                    reads += a_reg[i][0] is not None
                for j in range(C):  # b moves down; column j receives b[t - j, nf*C + j]
                    for i in range(R - 1, 0, -1):
                        b_reg[i][j] = b_reg[i - 1][j]
                    n, k = nf * C + j, t - j
                    b_reg[0][j] = B[k][n] if n < N and 0 <= k < K else None
                    reads += b_reg[0][j] is not None
                for i in range(R):
                    for j in range(C):
                        if a_reg[i][j] is not None and b_reg[i][j] is not None:
                            acc[i][j] += a_reg[i][j] * b_reg[i][j]
                            macs += 1
            for i in range(min(R, M - mf * R)):
                for j in range(min(C, N - nf * C)):
                    out[mf * R + i][nf * C + j] = acc[i][j]
    return macs, reads


def _ref_stationary(X: list, S: list, T: int, K: int, P: int, R: int, C: int,
                    out: list) -> tuple[int, int]:
    """out (T x P) += X (T x K) @ S (K x P), S tiles preloaded, partial sums flowing down."""
    macs = reads = 0
    for pf in range(math.ceil(P / C)):
        for kf in range(math.ceil(K / R)):
            s_reg: list[list[Any]] = [[None] * C for _ in range(R)]
            x_reg: list[list[Any]] = [[None] * C for _ in range(R)]
            psum = [[0] * C for _ in range(R)]
            for t in range(R):  # preload, last row first, shifting down
                for j in range(C):
                    for i in range(R - 1, 0, -1):
                        s_reg[i][j] = s_reg[i - 1][j]
                    k, p = kf * R + R - 1 - t, pf * C + j
                    s_reg[0][j] = S[k][p] if k < K and p < P else None
                    reads += s_reg[0][j] is not None
            for t in range(R, T + 2 * R + C - 2):
                u = t - R
                for i in range(R):  # x moves right; row i receives x[u - i, kf*R + i]
                    for j in range(C - 1, 0, -1):
                        x_reg[i][j] = x_reg[i][j - 1]
                    m, k = u - i, kf * R + i
                    x_reg[i][0] = X[m][k] if 0 <= m < T and k < K else None
                    reads += x_reg[i][0] is not None
                new = [[0] * C for _ in range(R)]
                for i in range(R):
                    for j in range(C):
                        above = psum[i - 1][j] if i > 0 else 0
                        if x_reg[i][j] is not None and s_reg[i][j] is not None:
                            above += x_reg[i][j] * s_reg[i][j]
                            macs += 1
                        new[i][j] = above
                psum = new
                for j in range(C):
                    m, p = u - (R - 1) - j, pf * C + j
                    if 0 <= m < T and p < P:
                        out[m][p] += psum[R - 1][j]
    return macs, reads


def reference_simulate(a: Any, b: Any, rows: int, cols: int, dataflow: str = "os") -> SystolicResult:
    """The same schedule as :func:`simulate`, as plain Python loops over every PE.

    Slow by design: it is the speed baseline of the benchmark and a second, independent
    check of the vectorised simulator on small cases. No trace.
    """
    a, b, out_dtype, _ = _check_operands(a, b)
    M, K = a.shape
    N = b.shape[1]
    M, K, N, R, C = _check_shape(M, K, N, rows, cols)
    df = _check_dataflow(dataflow)
    A, B = a.tolist(), b.tolist()
    if df == "os":
        out = [[0] * N for _ in range(M)]
        macs, reads = _ref_os(A, B, M, K, N, R, C, out)
    elif df == "ws":
        out = [[0] * N for _ in range(M)]
        macs, reads = _ref_stationary(A, B, M, K, N, R, C, out)
    else:
        out_t = [[0] * M for _ in range(N)]
        macs, reads = _ref_stationary(b.T.tolist(), a.T.tolist(), N, K, M, R, C, out_t)
        out = [list(r) for r in zip(*out_t, strict=True)]
    folds = fold_count(M, K, N, R, C, df)
    per_fold = cycles_per_fold(M, K, N, R, C, df)
    total = folds * per_fold
    return SystolicResult(
        output=np.array(out).astype(out_dtype), cycles=total, macs=macs,
        utilization=macs / (total * R * C), folds=folds, cycles_per_fold=per_fold,
        operand_reads=reads, dataflow=df, rows=R, cols=C, shape=(M, K, N),
    )


# --------------------------------------------------------------------------- tables


def compare_dataflows(shapes: Sequence[tuple[int, int, int]], rows: int, cols: int,
                      seed: int = 0) -> list[dict[str, Any]]:
    """Simulate every dataflow on random integer GEMMs; one row per (shape, dataflow).

    Each row is checked: the output equals a @ b and the cycles equal :func:`cycle_count`.
    """
    rng = np.random.default_rng(seed)
    out = []
    for M, K, N in shapes:
        a = rng.integers(-8, 8, size=(M, K))
        b = rng.integers(-8, 8, size=(K, N))
        for df in DATAFLOWS:
            res = simulate(a, b, rows, cols, df)
            if not np.array_equal(res.output, a @ b):
                raise AssertionError(f"{df} output differs from a @ b for {(M, K, N)}")
            if res.cycles != cycle_count(M, K, N, rows, cols, df):
                raise AssertionError(f"{df} cycles differ from the closed form for {(M, K, N)}")
            out.append(res.row())
    return out


# --------------------------------------------------------------------------- pictures

_ACTIVE, _HOLDS, _EMPTY = "#f4a261", "#dbe9f6", "#f5f5f5"
_FLOW = {
    "os": "a enters from the left, b from the top; each PE keeps one output",
    "ws": "b (weights) preloaded and stays; a enters from the left; partial sums flow down",
    "is": "a (inputs) preloaded and stays; b enters from the left; partial sums flow down",
}


def _fmt(v: Any) -> str:
    if isinstance(v, complex | np.complexfloating):
        return f"{v:.2g}"
    if float(v).is_integer():
        return str(int(v))
    return f"{float(v):.2g}"


def draw_cycle(ax: Any, trace: Trace, index: int, fontsize: float = 7) -> None:
    """Draw the array at one recorded cycle: colour = MAC this cycle / holds data / empty.

    Each PE shows ``a·b`` (the operands in its registers, '·' when empty) and ``Σ`` its
    partial sum.
    """
    R, C = trace.rows, trace.cols
    ax.set(xlim=(-0.5, C - 0.5), ylim=(R - 0.5, -0.5), aspect="equal", xticks=[], yticks=[])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    act, av, bv = trace.active[index], trace.a_valid[index], trace.b_valid[index]
    for i in range(R):
        for j in range(C):
            colour = _ACTIVE if act[i, j] else _HOLDS if (av[i, j] or bv[i, j]) else _EMPTY
            ax.add_patch(_rect(j - 0.46, i - 0.46, 0.92, colour))
            if R * C <= 64:
                sa = _fmt(trace.a[index, i, j]) if av[i, j] else "·"
                sb = _fmt(trace.b[index, i, j]) if bv[i, j] else "·"
                ax.text(j, i - 0.15, f"{sa}×{sb}", ha="center", va="center", fontsize=fontsize)
                ax.text(j, i + 0.22, f"Σ{_fmt(trace.acc[index, i, j])}", ha="center",
                        va="center", fontsize=fontsize - 1, color="0.3")
    phase = "preload" if trace.loading[index] else f"{int(act.sum())} MACs"
    ax.set_title(f"cycle {int(trace.cycle[index])} · {phase}", fontsize=9)


def _rect(x: float, y: float, size: float, colour: str) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), size, size, facecolor=colour, edgecolor="0.6", linewidth=0.6)


def _host() -> list[Any]:
    """The device the simulator runs on, for figure footers: NumPy in one host process, i.e.
    one CPU device, whatever accelerator the runtime has."""
    import jax

    return jax.devices("cpu")[:1]


def plot_trace(trace: Trace, cycles: Sequence[int] | None = None, ncols: int = 5,
               info: env.EnvInfo | None = None) -> Any:
    """Static multi-panel figure of recorded cycles (all of them, up to 20, by default)."""
    indices = list(range(min(len(trace), 20))) if cycles is None else list(cycles)
    if not indices:
        raise ValueError("plot_trace needs at least one cycle")
    ncols = min(ncols, len(indices))
    nrows = math.ceil(len(indices) / ncols)
    side = 0.55 * max(trace.rows, trace.cols) + 0.4
    fig, axes = plot.figure(ncols=ncols, nrows=nrows, width=side * ncols, height=(side + 0.25) * nrows,
                            squeeze=False)
    for ax in axes.flat[len(indices):]:
        ax.set_visible(False)
    for ax, index in zip(axes.flat, indices, strict=False):
        draw_cycle(ax, trace, index)
    fig.suptitle(
        f"{DATAFLOW_NAMES[trace.dataflow]} {trace.rows}x{trace.cols} array: {_FLOW[trace.dataflow]}"
        "\neach PE shows a×b in its registers and Σ its partial sum; orange: MAC this cycle, "
        "blue: holds an operand", fontsize=9)
    plot.label(fig, info, source="simulated", devices=_host())
    return fig


def trace_widget(trace: Trace) -> Any:
    """An ipywidgets slider that steps through the recorded cycles (live kernels only)."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    slider = widgets.IntSlider(value=0, min=0, max=len(trace) - 1, step=1, description="cycle",
                               continuous_update=True)
    output = widgets.Output()

    def show(change: Any = None) -> None:
        with output:
            output.clear_output(wait=True)
            side = 0.8 * max(trace.rows, trace.cols) + 0.5
            fig, ax = plot.figure(width=side, height=side + 0.3)
            draw_cycle(ax, trace, slider.value, fontsize=8)
            display(fig)
            plt.close(fig)

    slider.observe(show, names="value")
    show()
    return widgets.VBox([slider, output])


def plot_utilization(arrays: Sequence[int] = (8, 128, 256), dataflow: str = "ws",
                     simulated: dict[int, Sequence[int]] | None = None,
                     batch_kn: int = 4096, info: env.EnvInfo | None = None) -> Any:
    """Utilisation from :func:`cycle_count`: square GEMMs n^3 (left), batch M for a
    ``batch_kn`` x ``batch_kn`` weight (right). ``simulated`` maps an array size to GEMM
    sizes to run through :func:`simulate` and mark on the left panel.
    """
    fig, (left, right) = plot.figure(ncols=2, width=10, height=3.9)
    every_n = np.arange(4, 8193)
    powers = 2 ** np.arange(2, 14)
    batches = np.unique(np.geomspace(1, 16384, 120).astype(int))
    for s in arrays:
        line = left.plot(powers, [utilization(n, n, n, s, s, dataflow) for n in powers],
                         marker=".", label=f"{s}x{s}")[0]
        colour = line.get_color()
        left.plot(every_n, [utilization(n, n, n, s, s, dataflow) for n in every_n],
                  color=colour, linewidth=0.5, alpha=0.35)
        right.plot(batches, [utilization(m, batch_kn, batch_kn, s, s, dataflow) for m in batches],
                   color=colour, label=f"{s}x{s}")
        for n in (simulated or {}).get(s, ()):
            rng = np.random.default_rng(n)
            res = simulate(rng.standard_normal((n, n)), rng.standard_normal((n, n)), s, s, dataflow)
            left.plot([n], [res.utilization], "o", color=colour, markersize=6,
                      markerfacecolor="none")
    df = dataflow.upper()
    left.set(xscale="log", xlabel="GEMM size n (n x n times n x n)", ylabel="utilisation",
             ylim=(0, 1.02), title=f"{df}: square GEMMs (thick: n = 2^k; thin: every n)")
    right.set(xscale="log", xlabel=f"batch M (M x {batch_kn} times {batch_kn} x {batch_kn})",
              ylim=(0, 1.02), title=f"{df}: batch size for a {batch_kn}x{batch_kn} weight")
    if simulated:
        left.plot([], [], "o", color="0.4", markerfacecolor="none", label="simulated")
    left.legend(title="array", loc="upper left")
    right.legend(title="array", loc="upper left")
    plot.label(fig, info, source="closed-form model (circles: simulated)" if simulated
               else "closed-form model", devices=_host())
    return fig


def plot_simulator_speed(result: dict[str, Any], info: env.EnvInfo | None = None) -> Any:
    """PE-cycles per second of the per-PE loop and the vectorised simulator on the same cases
    (``result["same_case"]`` of :func:`bench_systolic`), against the array's side; the star is
    the vectorised headline case (128x128 array, 512^3 GEMM)."""
    from matplotlib.ticker import NullFormatter

    rows = result["same_case"]
    sides = [r["side"] for r in rows]
    fig, (left, right) = plot.figure(ncols=2, width=9.5, height=3.5)
    left.plot(sides, [r["loop_pe_cycles_per_s"] for r in rows], "o-", label="per-PE Python loop")
    left.plot(sides, [r["vectorised_pe_cycles_per_s"] for r in rows], "s-",
              label="vectorised (NumPy)")
    left.plot([128], [result["pe_cycles_per_s"]], "*", color="C1", markersize=12,
              label="vectorised, 128x128 array, 512^3 GEMM")
    left.set(xscale="log", yscale="log", xlabel="array side (side x side WS, GEMM of 2 x side)",
             ylabel="PE-cycles per second", title="simulator speed on the same cases")
    ticks = [*sides, 128]
    left.set_xticks(ticks, [str(s) for s in ticks])
    left.legend(loc="upper left", fontsize=8)
    right.plot(sides, [r["speedup"] for r in rows], "o-", color="C2")
    right.axhline(1, color="0.5", linewidth=0.8)
    right.set(xscale="log", yscale="log", xlabel="array side", ylabel="loop time / vectorised time",
              title="speed-up on the same case")
    right.set_xticks(sides, [str(s) for s in sides])
    for ax in (left, right):
        ax.xaxis.set_minor_formatter(NullFormatter())
    plot.label(fig, info, devices=_host())
    return fig


# --------------------------------------------------------------------------- benchmark


SAME_CASE_SIDES = (8, 16, 32, 64)  # array sides of the loop-vs-vectorised comparison (full mode)


def same_case_speedup(side: int, seed: int = 0, repeat: int = 3) -> dict[str, Any]:
    """Time :func:`reference_simulate` and :func:`simulate` on the *same* case.

    The case is a ``side`` x ``side`` weight-stationary array computing a GEMM of twice
    the side in every dimension (four folds), so both simulators do the same PE-cycles and
    the ratio of their times is the speed-up of vectorising, nothing else.
    """
    side = _check_positive_int("side", side)
    n = 2 * side
    rng = np.random.default_rng(seed)
    a = rng.integers(-8, 8, size=(n, n))
    b = rng.integers(-8, 8, size=(n, n))
    ref = reference_simulate(a, b, side, side, "ws")
    fast = simulate(a, b, side, side, "ws")
    loop_s = bench.timeit(reference_simulate, a, b, side, side, "ws", repeat=repeat,
                          number=1, warmup=0).best
    vec_s = bench.timeit(simulate, a, b, side, side, "ws", repeat=max(repeat, 3)).best
    pe_cycles = ref.cycles * side * side
    return {
        "array": f"{side}x{side} WS", "gemm": f"{n}x{n}x{n}", "side": side,
        "pe_cycles": pe_cycles, "loop_s": loop_s, "vectorised_s": vec_s,
        "loop_pe_cycles_per_s": pe_cycles / loop_s, "vectorised_pe_cycles_per_s": pe_cycles / vec_s,
        "speedup": loop_s / vec_s,
        "matches": bool(np.array_equal(ref.output, a @ b) and np.array_equal(fast.output, a @ b)
                        and ref.cycles == fast.cycles and ref.macs == fast.macs),
    }


def bench_systolic(quick: bool = False) -> dict[str, Any]:
    """Benchmark ``systolic``: simulator speed in PE-cycles per second.

    The headline is the vectorised simulator on a 128x128 weight-stationary array computing
    a 512x512x512 GEMM (measured in both modes). The speed-up over the per-PE Python loop
    (:func:`reference_simulate`) is measured on the same case for both, for arrays of
    growing side (:func:`same_case_speedup`); ``speedup_vs_loop`` is the largest of them.
    """
    rng = np.random.default_rng(0)
    n, size = 512, 128
    a = rng.standard_normal((n, n))
    b = rng.standard_normal((n, n))
    res = simulate(a, b, size, size, "ws")
    seconds = bench.timeit(simulate, a, b, size, size, "ws", repeat=1 if quick else 3,
                           number=1, warmup=0).best
    expected = a @ b
    matched = bool(np.allclose(res.output, expected, rtol=1e-9, atol=1e-9))
    pe_cycles = res.cycles * size * size
    sides = SAME_CASE_SIDES[:-1] if quick else SAME_CASE_SIDES
    same = [same_case_speedup(s, repeat=1 if s >= 32 else 3) for s in sides]
    top = same[-1]
    return {
        "case": f"{size}x{size} WS array, {n}x{n}x{n} GEMM",
        "seconds_128x128_ws_512": round(seconds, 3),
        "cycles_128x128_ws_512": res.cycles,
        "pe_cycles_128x128_ws_512": pe_cycles,
        "cycle_count_model": cycle_count(n, n, n, size, size, "ws"),
        "folds_128x128_ws_512": res.folds,
        "utilization_128x128_ws_512": round(res.utilization, 4),
        "output_matches": matched and res.cycles == cycle_count(n, n, n, size, size, "ws"),
        "max_abs_error": float(np.max(np.abs(res.output - expected))),
        "pe_cycles_per_s": pe_cycles / seconds,
        "same_case": same,
        "reference_case": f"{top['array']} array, {top['gemm']} GEMM",
        "reference_loop_pe_cycles_per_s": top["loop_pe_cycles_per_s"],
        "reference_matches": all(r["matches"] for r in same),
        "speedup_vs_loop": top["speedup"],
    }


# --------------------------------------------------------------------------- explorer

MEASURE_PE_CYCLES = 50_000_000  # "measure this point" simulates up to this many PE-cycles (about a second)


def systolic_model(dataflow: str, M: int, K: int, N: int, rows: int, cols: int) -> dict[str, Any]:
    """Cycles, folds and utilisation of one GEMM on one array (pure: the explorer's model).

    ``a`` is M x K, ``b`` K x N, the array ``rows`` x ``cols`` with ``dataflow`` "os", "ws" or
    "is". Everything follows the closed forms of this module (:func:`cycle_count`,
    :func:`fold_count`, :func:`cycles_per_fold`, :func:`utilization`, :func:`memory_traffic`).
    ``single_fold_square`` marks the case of the chapter's headline: M = K = N = rows = cols = n
    in output-stationary, one fold of 3n - 2 cycles.
    """
    df = _check_dataflow(dataflow)
    M, K, N, R, C = _check_shape(M, K, N, rows, cols)
    traffic = memory_traffic(M, K, N, R, C, df)
    cycles = cycle_count(M, K, N, R, C, df)
    return {
        "cycles": int(cycles),
        "folds": int(fold_count(M, K, N, R, C, df)),
        "cycles_per_fold": int(cycles_per_fold(M, K, N, R, C, df)),
        "macs": int(M * K * N),
        "utilization": float(utilization(M, K, N, R, C, df)),
        "systolic_reads": int(traffic.systolic_reads),
        "scalar_reads": int(traffic.scalar_operand_reads),
        "fewer_reads": float(traffic.reduction),
        "single_fold_square": bool(df == "os" and M == K == N == R == C),
        "three_n_minus_2": int(3 * R - 2) if M == K == N == R == C else 0,
    }


def measure_systolic_point(dataflow: str, M: int, K: int, N: int, rows: int, cols: int,
                           seed: int = 0) -> dict[str, Any]:
    """Run :func:`simulate` on random integer operands of that shape: its cycles, utilisation and
    whether the product is exact. Refuses GEMMs over :data:`MEASURE_PE_CYCLES` PE-cycles (the
    simulator would take more than a second or two there; the model needs no simulation)."""
    df = _check_dataflow(dataflow)
    M, K, N, R, C = _check_shape(M, K, N, rows, cols)
    pe_cycles = cycle_count(M, K, N, R, C, df) * R * C
    if pe_cycles > MEASURE_PE_CYCLES:
        raise ValueError(f"{M}x{K}x{N} on a {R}x{C} array is {pe_cycles:,} PE-cycles to simulate; "
                         f"the measurement simulates at most {MEASURE_PE_CYCLES:,} (pick a smaller GEMM or array)")
    rng = np.random.default_rng(seed)
    a = rng.integers(-8, 8, size=(M, K))
    b = rng.integers(-8, 8, size=(K, N))
    res = simulate(a, b, R, C, df)
    return {"cycles": int(res.cycles), "utilization": float(res.utilization), "M": M,
            "exact": bool(np.array_equal(res.output, a @ b))}


def systolic_explorer(info: env.EnvInfo | None = None):
    """The systolic-array explorer: a dataflow, a GEMM shape (M, K, N) and an array (rows, cols)
    -> cycles, folds and utilisation from the closed form; "measure this point" runs the
    cycle-level simulator at that setting and puts its cycle count on the curve."""
    from scalelab import widgets

    def draw(settings, pred, points):
        fig, (left, right) = plot.figure(ncols=2, width=10, height=3.9)
        df, K, N, R, C = (settings[k] for k in ("dataflow", "K", "N", "rows", "cols"))
        hi = max(64, 2 * settings["M"])
        ms = np.arange(1, hi + 1)
        for i, other in enumerate(DATAFLOWS):
            current = other == df
            kw = {"linewidth": 2.0 if current else 0.9, "alpha": 1.0 if current else 0.5, "color": f"C{i}"}
            left.plot(ms, [cycle_count(int(m), K, N, R, C, other) for m in ms],
                      label=f"{other.upper()}" + (" (current)" if current else ""), **kw)
            right.plot(ms, [utilization(int(m), K, N, R, C, other) for m in ms], **kw)
        colour = f"C{DATAFLOWS.index(df)}"
        left.scatter([settings["M"]], [pred["cycles"]], s=60, color=colour, zorder=3,
                     label=f"this setting: {pred['cycles']:,} cycles")
        right.scatter([settings["M"]], [pred["utilization"]], s=60, color=colour, zorder=3)
        if K == N == R == C:  # the 3n-2 case lies on the OS curve at M = n
            n = R
            left.scatter([n], [3 * n - 2], s=110, marker="D", facecolor="none", edgecolor="k", zorder=4,
                         label=f"3n-2 case (M=K=N=rows=cols={n}, OS): {3 * n - 2} cycles")
        else:
            left.plot([], [], " ", label="3n-2 case: set M=K=N=rows=cols, OS")
        for j, p in enumerate(points):
            r = p["result"]
            left.scatter([r["M"]], [r["cycles"]], marker="*", s=140, color="C3", zorder=5,
                         label="simulated (measure)" if j == 0 else None)
            right.scatter([r["M"]], [r["utilization"]], marker="*", s=140, color="C3", zorder=5)
        left.set(xlabel=f"M (rows of a; K={K}, N={N}, array {R}x{C})", ylabel="cycles",
                 title="cycles = folds x cycles per fold")
        right.set(xlabel="M", ylabel="utilisation", ylim=(0, 1.02), title="utilisation = MACs / (cycles x PEs)")
        left.legend(fontsize=7, loc="upper left")
        plot.label(fig, info, source="closed-form model (stars: simulated)", devices=_host())
        return fig

    controls = {
        "dataflow": widgets.dropdown("dataflow", list(DATAFLOWS)),
        "M": widgets.slider("M", 8, 1, 256, integer=True),
        "K": widgets.slider("K", 8, 1, 256, integer=True),
        "N": widgets.slider("N", 8, 1, 256, integer=True),
        "rows": widgets.slider("rows", 8, 1, 64, integer=True),
        "cols": widgets.slider("cols", 8, 1, 64, integer=True),
    }
    return widgets.Explorer(
        "systolic", "Systolic-array explorer", controls, systolic_model, draw,
        measure=lambda dataflow, M, K, N, rows, cols: measure_systolic_point(dataflow, M, K, N, rows, cols),
        shown=["cycles", "folds", "cycles_per_fold", "utilization", "fewer_reads", "single_fold_square"],
        labels={"cycles_per_fold": "cycles/fold", "utilization": "utilisation",
                "fewer_reads": "fewer reads than a scalar loop (x)", "single_fold_square": "3n-2 case"},
        note="'measure this point' runs the cycle-level simulator on random integers of that shape "
             f"(up to {MEASURE_PE_CYCLES:,} PE-cycles).")
