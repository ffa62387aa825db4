"""LLVM IR for the inner loop of numba's training walk: one distinct row's occurrences, one column block.

Why IR: the loop over a row's occurrences adds, per occurrence, a grad_output block into the row's
gradient and the row into a bag's output. Written as numba loops over arrays (the first version),
the gradient went through memory for every occurrence and each short loop paid LLVM's runtime
alias checks: 24 ns per occurrence of a dim-32 row, 6x the forward lookup's cost per id. Here, as
in `impls.numba_codegen` (the forward's bag loops), the block's width W is a compile-time constant:
the row block is one ``<W x T>`` load widened to float32 in registers, the gradient an LLVM
``<W x float>`` value that stays in registers for the whole run, and the run's result is stored
once.

`train_run` (a numba intrinsic) dispatches to the loop for a (storage kind, width); its arguments,
all i64 (addresses as integers):

- ``keys``: the table's sorted keys (``row << 32 | position``), ``first`` / ``end``: the run;
- ``slot_of`` (int32 per position: the occurrence's row in the stage buffers), ``scale_of``
  (float32 per position; read only with flag ``SCALED``, else every scale is 1.0);
- ``gs`` / ``os``: the address of column block 0 of stage row 0 of the grad_output stage and the
  forward stage, ``stride`` the bytes between stage rows;
- ``row``: the address of the row's block in the table (of the storage kind), ``wout``: where the
  block, widened to float32, is stored, ``grad``: where the block of the row's gradient is stored;
- ``psw``: the per-sample weight gradients (float32 per position), written with flag ``WEIGHTED``:
  each block's partial dot product is stored (flag ``FIRST_BLOCK``) or added;
- ``flags``: ``SCALED | WEIGHTED | FIRST_BLOCK | FORWARD`` (FORWARD: add ``scale * row`` into
  the occurrence's forward stage row).

Arithmetic: per occurrence ``acc = acc + scale * g`` and ``o = o + scale * w`` (each product and
sum rounded, no FMA: no fast-math flags are set); the dot product ``w . g`` of a block is summed
as a balanced tree over its lanes. Every order here is one the tolerance allows.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from impls.numba_codegen import F32, FLOAT_KINDS, I16, I32, I64, KIND_F16, KIND_F32, _load_row, _splat

SCALED = 1
WEIGHTED = 2
FIRST_BLOCK = 4
FORWARD = 8
L2 = 16
DECOUPLED = 32
ADAGRAD = 64
ROWWISE = 128

# Widest column block: a <64 x float> gradient and row are 16 AVX2 registers (8 AVX-512).
MAX_TRAIN_WIDTH = 64

_RUN_ARGS = (
    "keys", "first", "end", "slot_of", "scale_of", "gs", "os", "stride", "row", "wout", "grad", "psw",
    "flags", "hyper", "ss",
)  # fmt: skip
_UPDATE_ARGS = ("row", "wbuf", "grad", "state", "flags", "hyper", "coef")


def train_widths() -> tuple[int, ...]:
    """Column block widths, widest first; a dim is covered greedily (dim 100 = 64 + 32 + 4)."""
    widths = []
    w = MAX_TRAIN_WIDTH
    while w >= 1:
        widths.append(w)
        w //= 2
    return tuple(widths)


def _hsum(b: ir.IRBuilder, v: ir.Value, width: int) -> ir.Value:
    """The sum of ``v``'s lanes as a balanced tree (halves added until one lane is left)."""
    while width > 1:
        half = width // 2
        undef = ir.Constant(v.type, ir.Undefined)
        lo = b.shuffle_vector(v, undef, ir.Constant(ir.VectorType(I32, half), list(range(half))))
        hi = b.shuffle_vector(v, undef, ir.Constant(ir.VectorType(I32, half), list(range(half, width))))
        v = b.fadd(lo, hi)
        width = half
    return b.extract_element(v, I32(0))


def _flag(b: ir.IRBuilder, flags: ir.Value, bit: int) -> ir.Value:
    return b.icmp_unsigned("!=", b.and_(flags, I64(bit)), I64(0))


def _hyper(b: ir.IRBuilder, hyper: ir.Value, index: int) -> ir.Value:
    """``hyper[index]`` (float32: lr, eps, weight decay, 1 - lr * weight decay)."""
    return b.load(b.gep(b.inttoptr(hyper, ir.PointerType(F32)), [I64(index)], inbounds=True), align=4)


def _store_row(b: ir.IRBuilder, address: ir.Value, v: ir.Value, width: int, kind: int) -> None:
    """``v`` (``<width x float>``) rounded once, to nearest even, to ``kind`` and stored."""
    if kind == KIND_F32:
        b.store(v, b.inttoptr(address, ir.PointerType(ir.VectorType(F32, width))), align=4)
        return
    if kind == KIND_F16:
        half = b.fptrunc(v, ir.VectorType(ir.HalfType(), width))
        b.store(half, b.inttoptr(address, ir.PointerType(ir.VectorType(ir.HalfType(), width))), align=2)
        return
    # bfloat16: add 0x7FFF plus the kept lowest bit, keep the top 16 bits; a NaN stays a quiet NaN
    lanes = ir.VectorType(I32, width)

    def splat(x: int) -> ir.Constant:
        return ir.Constant(lanes, [x] * width)

    bits = b.bitcast(v, lanes)
    top = b.lshr(bits, splat(16))
    rounded = b.lshr(b.add(b.add(bits, splat(0x7FFF)), b.and_(top, splat(1))), splat(16))
    nan = b.icmp_unsigned(">", b.and_(bits, splat(0x7FFFFFFF)), splat(0x7F800000))
    result = b.select(nan, b.or_(top, splat(0x40)), rounded)
    halves = ir.VectorType(I16, width)
    b.store(b.trunc(result, halves), b.inttoptr(address, ir.PointerType(halves)), align=2)


def _define_run(module: ir.Module, width: int, kind: int) -> ir.Function:
    """One run of a row's occurrences for one column block (module docstring)."""
    name = f"jagbench_train_run_k{kind}_w{width}"
    fn = cgutils.get_or_insert_function(module, ir.FunctionType(I64, [I64] * len(_RUN_ARGS)), name)
    if not fn.is_declaration:
        return fn
    fn.linkage = "internal"
    fn.attributes.add("noinline")
    a = dict(zip(_RUN_ARGS, fn.args, strict=True))
    for arg_name, arg in a.items():
        arg.name = arg_name
    vec = ir.VectorType(F32, width)
    vec_ptr = ir.PointerType(vec)
    f32_ptr = ir.PointerType(F32)
    names = ("entry", "head", "body", "psw", "psw_done", "forward", "latch", "done", "l2", "finish")
    blocks = {n: fn.append_basic_block(n) for n in names}
    b = ir.IRBuilder(blocks["entry"])
    keys = b.inttoptr(a["keys"], ir.PointerType(I64))
    slots = b.inttoptr(a["slot_of"], ir.PointerType(I32))
    scales = b.inttoptr(a["scale_of"], f32_ptr)
    scaled = _flag(b, a["flags"], SCALED)
    weighted = _flag(b, a["flags"], WEIGHTED)
    first_block = _flag(b, a["flags"], FIRST_BLOCK)
    forward = _flag(b, a["flags"], FORWARD)
    w = _load_row(b, a["row"], width, kind)
    b.store(w, b.inttoptr(a["wout"], vec_ptr), align=4)
    b.branch(blocks["head"])

    b.position_at_end(blocks["head"])
    q = b.phi(I64, "q")
    acc = b.phi(vec, "acc")
    q.add_incoming(a["first"], blocks["entry"])
    acc.add_incoming(ir.Constant(vec, None), blocks["entry"])
    b.cbranch(b.icmp_signed("<", q, a["end"]), blocks["body"], blocks["done"])

    b.position_at_end(blocks["body"])
    position = b.and_(b.load(b.gep(keys, [q], inbounds=True), align=8), I64((1 << 32) - 1))
    slot = b.sext(b.load(b.gep(slots, [position], inbounds=True), align=4), I64)
    # scale_of has one element when no scale is needed: element 0 is read then, and 1.0 used
    scale = b.load(b.gep(scales, [b.select(scaled, position, I64(0))], inbounds=True), align=4)
    scale = b.select(scaled, scale, ir.Constant(F32, 1.0))
    stage_offset = b.mul(slot, a["stride"])
    g = b.load(b.inttoptr(b.add(a["gs"], stage_offset), vec_ptr), align=4)
    summed = b.fadd(acc, b.fmul(_splat(b, scale, width), g))
    b.cbranch(weighted, blocks["psw"], blocks["psw_done"])

    b.position_at_end(blocks["psw"])
    part = _hsum(b, b.fmul(w, g), width)
    psw_ptr = b.gep(b.inttoptr(a["psw"], f32_ptr), [position], inbounds=True)
    before = b.select(first_block, ir.Constant(F32, 0.0), b.load(psw_ptr, align=4))
    b.store(b.select(first_block, part, b.fadd(before, part)), psw_ptr, align=4)
    b.branch(blocks["psw_done"])

    b.position_at_end(blocks["psw_done"])
    b.cbranch(forward, blocks["forward"], blocks["latch"])

    b.position_at_end(blocks["forward"])
    o_ptr = b.inttoptr(b.add(a["os"], stage_offset), vec_ptr)
    o = b.load(o_ptr, align=4)
    b.store(b.fadd(o, b.fmul(_splat(b, scale, width), w)), o_ptr, align=4)
    b.branch(blocks["latch"])

    b.position_at_end(blocks["latch"])
    q.add_incoming(b.add(q, I64(1)), blocks["latch"])
    acc.add_incoming(summed, blocks["latch"])
    b.branch(blocks["head"])

    # H = G + wd w (l2) or G, stored; the block's sum of H^2 stored or added into ss
    b.position_at_end(blocks["done"])
    b.cbranch(_flag(b, a["flags"], L2), blocks["l2"], blocks["finish"])
    b.position_at_end(blocks["l2"])
    decayed = b.fadd(acc, b.fmul(_splat(b, _hyper(b, a["hyper"], 2), width), w))
    b.branch(blocks["finish"])
    b.position_at_end(blocks["finish"])
    h = b.phi(vec, "h")
    h.add_incoming(acc, blocks["done"])
    h.add_incoming(decayed, blocks["l2"])
    b.store(h, b.inttoptr(a["grad"], vec_ptr), align=4)
    squares = _hsum(b, b.fmul(h, h), width)
    ss_ptr = b.inttoptr(a["ss"], f32_ptr)
    before_ss = b.select(first_block, ir.Constant(F32, 0.0), b.load(ss_ptr, align=4))
    b.store(b.select(first_block, squares, b.fadd(before_ss, squares)), ss_ptr, align=4)
    b.ret(I64(0))
    return fn


def _define_update(module: ir.Module, width: int, kind: int) -> ir.Function:
    """The optimizer update of one column block of a row, rounded once to ``kind`` and stored.

    ``wbuf`` / ``grad``: the block widened and its H (from the run); ``coef``: the address of
    the row's ``mu = lr / (sqrt(m) + eps)`` (rowwise_adagrad); ``state``: the address of the
    block's per-element state (adagrad). sgd: ``w - lr H``; adagrad: ``m += H^2``,
    ``w - lr H / (sqrt(m) + eps)``; rowwise_adagrad: ``w - mu H``; with DECOUPLED ``w`` is first
    scaled by ``1 - lr wd``.
    """
    name = f"jagbench_train_update_k{kind}_w{width}"
    fn = cgutils.get_or_insert_function(module, ir.FunctionType(I64, [I64] * len(_UPDATE_ARGS)), name)
    if not fn.is_declaration:
        return fn
    fn.linkage = "internal"
    fn.attributes.add("noinline")
    a = dict(zip(_UPDATE_ARGS, fn.args, strict=True))
    for arg_name, arg in a.items():
        arg.name = arg_name
    vec = ir.VectorType(F32, width)
    vec_ptr = ir.PointerType(vec)
    blocks = {n: fn.append_basic_block(n) for n in ("entry", "other", "sgd", "adagrad", "rowwise", "store")}
    b = ir.IRBuilder(blocks["entry"])
    w = b.load(b.inttoptr(a["wbuf"], vec_ptr), align=4)
    h = b.load(b.inttoptr(a["grad"], vec_ptr), align=4)
    lr = _splat(b, _hyper(b, a["hyper"], 0), width)
    decayed = b.fmul(_splat(b, _hyper(b, a["hyper"], 3), width), w)
    kept = b.select(_flag(b, a["flags"], DECOUPLED), decayed, w)
    b.cbranch(_flag(b, a["flags"], ADAGRAD), blocks["adagrad"], blocks["other"])

    b.position_at_end(blocks["other"])
    b.cbranch(_flag(b, a["flags"], ROWWISE), blocks["rowwise"], blocks["sgd"])

    b.position_at_end(blocks["sgd"])
    sgd_new = b.fsub(kept, b.fmul(lr, h))
    b.branch(blocks["store"])

    b.position_at_end(blocks["adagrad"])
    state_ptr = b.inttoptr(a["state"], vec_ptr)
    m = b.fadd(b.load(state_ptr, align=4), b.fmul(h, h))
    b.store(m, state_ptr, align=4)
    sqrt = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec]), f"llvm.sqrt.v{width}f32")
    denominator = b.fadd(b.call(sqrt, [m]), _splat(b, _hyper(b, a["hyper"], 1), width))
    adagrad_new = b.fsub(kept, b.fdiv(b.fmul(lr, h), denominator))
    b.branch(blocks["store"])

    b.position_at_end(blocks["rowwise"])
    mu = b.load(b.inttoptr(a["coef"], ir.PointerType(F32)), align=4)
    rowwise_new = b.fsub(kept, b.fmul(_splat(b, mu, width), h))
    b.branch(blocks["store"])

    b.position_at_end(blocks["store"])
    new = b.phi(vec, "new")
    new.add_incoming(sgd_new, blocks["sgd"])
    new.add_incoming(adagrad_new, blocks["adagrad"])
    new.add_incoming(rowwise_new, blocks["rowwise"])
    _store_row(b, a["row"], new, width, kind)
    b.ret(I64(0))
    return fn


def generated_loops() -> tuple[tuple[int, int], ...]:
    """``(kind, width)`` of every generated loop: each float kind at every width."""
    return tuple((k, w) for k in FLOAT_KINDS for w in train_widths())


# Returned for a (kind, width) without a loop (a bug in the caller).
UNKNOWN_RUN = -2


def _define_dispatch(module: ir.Module, name: str, define, n_args: int) -> ir.Function:
    """``name(kind, width, *args)``: a switch to the generated function for (kind, width)."""
    fn = cgutils.get_or_insert_function(module, ir.FunctionType(I64, [I64] * (2 + n_args)), name)
    if not fn.is_declaration:
        return fn
    fn.linkage = "internal"
    kind, width, *args = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    unknown = fn.append_basic_block("unknown")
    switch = b.switch(b.add(b.mul(kind, I64(1 << 16)), width), unknown)
    for k, w in generated_loops():
        case = fn.append_basic_block(f"k{k}_w{w}")
        switch.add_case(I64((k << 16) + w), case)
        b.position_at_end(case)
        b.ret(b.call(define(module, w, k), args))
    b.position_at_end(unknown)
    b.ret(I64(UNKNOWN_RUN))
    return fn


def _typer(name: str, define, n_args: int, args: tuple):
    if len(args) != 2 + n_args or not all(isinstance(t, types.Integer) for t in args):
        return None

    def codegen(context, builder, sig, llargs):
        fn = _define_dispatch(builder.module, name, define, n_args)
        widened = [builder.sext(v, I64) if v.type.width < 64 else v for v in llargs]
        return builder.call(fn, widened)

    return types.int64(*args), codegen


@intrinsic
def train_run(
    typingctx, kind, width, keys, first, end, slot_of, scale_of, gs, os, stride, row, wout, grad, psw,
    flags, hyper, ss,
):  # fmt: skip
    """One run of a row's occurrences for one column block of ``width`` (one of `train_widths`) of
    a table stored as ``kind`` (module docstring); returns 0, or `UNKNOWN_RUN`."""
    args = (
        kind,
        width,
        keys,
        first,
        end,
        slot_of,
        scale_of,
        gs,
        os,
        stride,
        row,
        wout,
        grad,
        psw,
        flags,
        hyper,
        ss,
    )
    return _typer("jagbench_train_run", _define_run, len(_RUN_ARGS), args)


@intrinsic
def train_update(typingctx, kind, width, row, wbuf, grad, state, flags, hyper, coef):  # noqa: ARG001
    """The optimizer update of one column block of a row (`_define_update`); returns 0, or
    `UNKNOWN_RUN`."""
    return _typer(
        "jagbench_train_update",
        _define_update,
        len(_UPDATE_ARGS),
        (kind, width, row, wbuf, grad, state, flags, hyper, coef),
    )
