"""LLVM IR for the inner loops of the ``numba`` kernel: one feature's bags, one block of columns.

Why IR and not numba code: a bag's sum is latency-bound work on short rows (16-64 floats), and
what decides its speed is that the accumulator lives in vector registers for the whole bag and
the row is read as one vector load. Written as a numba loop over a per-thread array, the
accumulator goes through memory for every id (LLVM cannot prove that array does not alias the
table it reads through a raw address), which measured 1.4x slower than torch. Here the column
block's width is a compile-time constant, so the accumulator is an LLVM vector value
(``<W x float>``, held in registers), the row is one ``<W x T>`` load, widened to float32 in
registers (float16 by ``fpext``, bfloat16 by shifting its bits into a float32's top half), and
the bag is written once. This is what FBGEMM's JIT does for each embedding dim; here a table of
any dim is covered by blocks of widths 256, 128, ..., 1 (`block_widths`).

Row-wise quantized rows (kinds ``KIND_I8``, ``KIND_I4``, ``KIND_I2``) are read packed, in
FBGEMM's layout (`QUANTIZED_ROW_LAYOUT`): the block's codes are one ``<bytes x i8>`` load,
widened to i32; for 4 and 2 bits a shuffle gives each lane its byte, a shift by its place
(LSB first) and a mask its code; the codes become float32 exactly, and ``x = s * q + b`` is formed
in registers from the row's fp16 scale and bias (``qparams`` bytes before the block). Their loops
exist for the widths of at least a byte of codes (`quantized_widths`): validation takes int4 dims
even and int2 dims multiples of 4, so every block starts on a byte.

Arithmetic, per column: ``acc = fma(x, w, acc)`` in id order (one rounding per id; without
per-sample weights ``w`` is 1.0 and this is ``fl(acc + x)`` exactly), then a division by the
length for MEAN. No fast-math flags are set, so LLVM does not reassociate: the result does not
depend on the blocking or on threads, and ``harness.tolerance`` bounds it (it allows each product
rounded or not). For a quantized row ``x`` is ``fma(q, s, b)``, which equals ``fl(s q + b)``:
``s q`` is exact in float32 (an 11-bit significand times a code below 256), so the sum is the one
rounding (``harness.tolerance``, "Quantized tables", bounds it). The FMA is one instruction whose
row load comes straight from memory; a separate multiply needs a register for the product, and
on AVX2 a 128-column block's accumulators then spill (wide: numba / torch 1.02, 1.03, 1.03 ->
1.17, 1.09, 1.16 in three alternating runs of ``scripts/probe_numba.py --warm``, 2026-12-01).

Each generated function pools ``n_samples`` consecutive bags of one feature for one column block
and returns the position (in ``values``) of the first id outside the table, or -1; bad ids are
skipped, never read. Arguments, all i64 (addresses as integers): ids, lengths (already at the
first bag), n_samples, start (position of the first bag's first id), last (last valid position
in ``values``, for the prefetch), table (address of row 0's first column of the block), rows,
row_bytes, qparams (for a quantized kind: bytes from the block's first code back to the row's fp16
scale, a negative number; unused otherwise), weights (the float32 per-sample weights),
weight_step (4; or 0 with ``weights`` the address of a 1.0 when the batch has none:
``x * 1.0 == x`` exactly, so one loop serves both and the compile is half as long), ahead (ids
between the prefetched row and the summed one), is_mean (0/1), out (address of the first bag's
output block), out_stride (bytes between bags). Every cache line of the prefetched row's block is
prefetched (measured on the wide workload: 1 line 12.4 ms, 4 lines 8.4, all 16 lines 7.8); for a
quantized row also its scale and bias and its block's last byte (such rows are rarely aligned to
a line: 68 bytes at int8 dim 64).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

KIND_F32 = 0
KIND_F16 = 1
KIND_BF16 = 2
# Row-wise quantized rows (`QUANTIZED_ROW_LAYOUT`): codes of 8, 4 or 2 bits, fp16 scale and bias.
KIND_I8 = 3
KIND_I4 = 4
KIND_I2 = 5

ELEMENT_BYTES = {KIND_F32: 4, KIND_F16: 2, KIND_BF16: 2}
CODE_BITS = {KIND_I8: 8, KIND_I4: 4, KIND_I2: 2}
FLOAT_KINDS = (KIND_F32, KIND_F16, KIND_BF16)
QUANTIZED_KINDS = (KIND_I8, KIND_I4, KIND_I2)
QPARAM_BYTES = 4
QUANTIZED_ROW_LAYOUT = "[fp16 scale][fp16 bias][codes packed LSB-first], no padding"

# Widest column block: 128 float32 accumulators are 8 AVX-512 (16 AVX2) registers.
MAX_WIDTH = 256

I1 = ir.IntType(1)
I8 = ir.IntType(8)
I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
F32 = ir.FloatType()

_ARGS = (
    "ids", "lengths", "n_samples", "start", "last", "table", "rows", "row_bytes", "qparams", "weights",
    "weight_step", "ahead", "is_mean", "out", "out_stride",
)  # fmt: skip


def block_widths() -> tuple[int, ...]:
    """Column block widths, widest first: a dim is covered greedily (dim 40 = 32 + 8)."""
    widths = []
    w = MAX_WIDTH
    while w >= 1:
        widths.append(w)
        w //= 2
    return tuple(widths)


def _splat(builder: ir.IRBuilder, value: ir.Value, width: int) -> ir.Value:
    vec = ir.VectorType(value.type, width)
    one = builder.insert_element(ir.Constant(vec, ir.Undefined), value, I32(0))
    return builder.shuffle_vector(
        one, ir.Constant(vec, ir.Undefined), ir.Constant(ir.VectorType(I32, width), [0] * width)
    )


def _load_row(builder: ir.IRBuilder, address: ir.Value, width: int, kind: int) -> ir.Value:
    """The ``width`` elements at ``address`` as ``<width x float>``, widened exactly."""
    if kind == KIND_F32:
        ptr = builder.inttoptr(address, ir.PointerType(ir.VectorType(F32, width)))
        return builder.load(ptr, align=4)
    if kind == KIND_F16:
        ptr = builder.inttoptr(address, ir.PointerType(ir.VectorType(ir.HalfType(), width)))
        return builder.fpext(builder.load(ptr, align=2), ir.VectorType(F32, width))
    ptr = builder.inttoptr(address, ir.PointerType(ir.VectorType(I16, width)))
    wide = builder.zext(builder.load(ptr, align=2), ir.VectorType(I32, width))
    shifted = builder.shl(wide, ir.Constant(ir.VectorType(I32, width), [16] * width))
    return builder.bitcast(shifted, ir.VectorType(F32, width))


def quantized_widths(kind: int) -> tuple[int, ...]:
    """Block widths of the loops for a quantized ``kind``: those at least a byte's codes wide. The
    problem model (`harness.validate`) takes int4 dims even and int2 dims multiples of 4, as the
    libraries do; then every greedy block is a whole number of bytes and starts on a byte."""
    per_byte = 8 // CODE_BITS[kind]
    return tuple(w for w in block_widths() if w >= per_byte)


def block_offset(kind: int, done: int) -> int:
    """The byte offset of column ``done`` in a row of ``kind`` (after the qparams when quantized)."""
    if kind in QUANTIZED_KINDS:
        return QPARAM_BYTES + done * CODE_BITS[kind] // 8
    return done * ELEMENT_BYTES[kind]


def _load_codes(builder: ir.IRBuilder, address: ir.Value, width: int, kind: int) -> ir.Value:
    """The ``width`` codes at ``address`` as ``<width x float>`` (exact: integers below 256): one
    vector load of their bytes, widened to i32; below 8 bits, each lane's byte picked by a shuffle,
    shifted right by its place (LSB first) and masked."""
    bits = CODE_BITS[kind]
    per_byte = 8 // bits
    n_bytes = width // per_byte
    ptr = builder.inttoptr(address, ir.PointerType(ir.VectorType(I8, n_bytes)))
    wide = builder.zext(builder.load(ptr, align=1), ir.VectorType(I32, n_bytes))
    lanes = ir.VectorType(I32, width)
    if bits < 8:
        byte_of = [i // per_byte for i in range(width)]
        wide = builder.shuffle_vector(wide, ir.Constant(wide.type, ir.Undefined), ir.Constant(lanes, byte_of))
        wide = builder.lshr(wide, ir.Constant(lanes, [(i % per_byte) * bits for i in range(width)]))
        wide = builder.and_(wide, ir.Constant(lanes, [(1 << bits) - 1] * width))
    return builder.uitofp(wide, ir.VectorType(F32, width))


def _fma(builder: ir.IRBuilder, x: ir.Value, y: ir.Value, z: ir.Value) -> ir.Value:
    """``x * y + z`` on ``<width x float>`` vectors, rounded once (``llvm.fma``: one instruction on
    FMA hardware, whose load can come straight from memory; a separate multiply and add need a
    register for the product, which spilled a wide block's accumulators on AVX2)."""
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(x.type, [x.type] * 3), f"llvm.fma.v{x.type.count}f32"
    )
    return builder.call(fn, [x, y, z])


def _dequantized_row(
    builder: ir.IRBuilder, codes_address: ir.Value, qparams: ir.Value, width: int, kind: int
) -> ir.Value:
    """``scale * q + bias`` as ``<width x float>``, one FMA: the product is exact (an fp16 scale
    times a code below 256 fits float32's 24 bits), so this is ``fl(scale * q + bias)``."""
    scale_address = builder.add(codes_address, qparams)
    half_ptr = ir.PointerType(ir.HalfType())
    scale = builder.fpext(builder.load(builder.inttoptr(scale_address, half_ptr), align=1), F32)
    bias_address = builder.add(scale_address, I64(2))
    bias = builder.fpext(builder.load(builder.inttoptr(bias_address, half_ptr), align=1), F32)
    q = _load_codes(builder, codes_address, width, kind)
    return _fma(builder, q, _splat(builder, scale, width), _splat(builder, bias, width))


def _prefetch_addresses(
    builder: ir.IRBuilder, block: ir.Value, qparams: ir.Value, width: int, kind: int
) -> list[ir.Value]:
    """The addresses to prefetch for a row whose block starts at ``block``: every cache line of the
    block; for a quantized row also its scale and bias and the block's last byte (such a row is
    rarely aligned to a line: 68 bytes at int8 dim 64)."""
    if kind in FLOAT_KINDS:
        lines = -(-width * ELEMENT_BYTES[kind] // 64)
        return [builder.add(block, I64(64 * line)) for line in range(lines)]
    n_bytes = width * CODE_BITS[kind] // 8
    addresses = [builder.add(block, qparams)]
    addresses += [builder.add(block, I64(64 * line)) for line in range(-(-n_bytes // 64))]
    if n_bytes > 1:
        addresses.append(builder.add(block, I64(n_bytes - 1)))
    return addresses


def _define(module: ir.Module, width: int, kind: int) -> ir.Function:
    name = f"jagbench_bag_k{kind}_w{width}"
    fn = cgutils.get_or_insert_function(module, ir.FunctionType(I64, [I64] * len(_ARGS)), name)
    if not fn.is_declaration:
        return fn
    fn.linkage = "internal"
    # Called once per (feature, chunk, block), not per bag, so inlining buys nothing and slows the
    # compile (measured with an earlier set of 54 loops: 38 s cold inlined, 19 s not).
    fn.attributes.add("noinline")
    a = dict(zip(_ARGS, fn.args, strict=True))
    for arg_name, arg in a.items():
        arg.name = arg_name
    vec = ir.VectorType(F32, width)
    zero = ir.Constant(vec, None)
    prefetch = cgutils.get_or_insert_function(
        module, ir.FunctionType(ir.VoidType(), [ir.PointerType(I8), I32, I32, I32]), "llvm.prefetch.p0"
    )

    entry = fn.append_basic_block("entry")
    bag_head = fn.append_basic_block("bag_head")
    bag_body = fn.append_basic_block("bag_body")
    id_head = fn.append_basic_block("id_head")
    id_body = fn.append_basic_block("id_body")
    id_good = fn.append_basic_block("id_good")
    id_bad = fn.append_basic_block("id_bad")
    id_next = fn.append_basic_block("id_next")
    bag_end = fn.append_basic_block("bag_end")
    bag_mean = fn.append_basic_block("bag_mean")
    bag_store = fn.append_basic_block("bag_store")
    done = fn.append_basic_block("done")
    b = ir.IRBuilder(entry)
    ids_ptr = b.inttoptr(a["ids"], ir.PointerType(I64))
    lengths_ptr = b.inttoptr(a["lengths"], ir.PointerType(I64))
    b.branch(bag_head)

    # for s in range(n_samples): one bag, ids values[pos : pos + n]
    b.position_at_end(bag_head)
    s = b.phi(I64, "s")
    pos = b.phi(I64, "pos")
    bad = b.phi(I64, "bad")
    s.add_incoming(I64(0), entry)
    pos.add_incoming(a["start"], entry)
    bad.add_incoming(I64(-1), entry)
    b.cbranch(b.icmp_signed("<", s, a["n_samples"]), bag_body, done)

    b.position_at_end(bag_body)
    n = b.load(b.gep(lengths_ptr, [s], inbounds=True), align=8)
    end = b.add(pos, n)
    b.branch(id_head)

    b.position_at_end(id_head)
    p = b.phi(I64, "p")
    acc = b.phi(vec, "acc")
    bad_in_bag = b.phi(I64, "bad_in_bag")
    p.add_incoming(pos, bag_body)
    acc.add_incoming(zero, bag_body)
    bad_in_bag.add_incoming(bad, bag_body)
    b.cbranch(b.icmp_signed("<", p, end), id_body, bag_end)

    # Prefetch the row of the id `ahead` positions on (row 0 when that id is bad: never faults).
    b.position_at_end(id_body)
    later = b.add(p, a["ahead"])
    later = b.select(b.icmp_signed("<", later, a["last"]), later, a["last"])
    later_id = b.load(b.gep(ids_ptr, [later], inbounds=True), align=8)
    later_id = b.select(b.icmp_unsigned("<", later_id, a["rows"]), later_id, I64(0))
    later_row = b.add(a["table"], b.mul(later_id, a["row_bytes"]))
    for address in _prefetch_addresses(b, later_row, a["qparams"], width, kind):
        b.call(prefetch, [b.inttoptr(address, ir.PointerType(I8)), I32(0), I32(3), I32(1)])
    row = b.load(b.gep(ids_ptr, [p], inbounds=True), align=8)
    # One unsigned compare rejects negative and too-large ids alike.
    b.cbranch(b.icmp_unsigned("<", row, a["rows"]), id_good, id_bad)

    b.position_at_end(id_good)
    row_address = b.add(a["table"], b.mul(row, a["row_bytes"]))
    if kind in QUANTIZED_KINDS:
        x = _dequantized_row(b, row_address, a["qparams"], width, kind)
    else:
        x = _load_row(b, row_address, width, kind)
    weight = b.add(a["weights"], b.mul(p, a["weight_step"]))
    w = b.load(b.inttoptr(weight, ir.PointerType(F32)), align=4)
    summed = _fma(b, x, _splat(b, w, width), acc)
    b.branch(id_next)

    b.position_at_end(id_bad)
    first_bad = b.select(b.icmp_signed("<", bad_in_bag, I64(0)), p, bad_in_bag)
    b.branch(id_next)

    b.position_at_end(id_next)
    acc_next = b.phi(vec)
    acc_next.add_incoming(summed, id_good)
    acc_next.add_incoming(acc, id_bad)
    bad_next = b.phi(I64)
    bad_next.add_incoming(bad_in_bag, id_good)
    bad_next.add_incoming(first_bad, id_bad)
    acc.add_incoming(acc_next, id_next)
    bad_in_bag.add_incoming(bad_next, id_next)
    p.add_incoming(b.add(p, I64(1)), id_next)
    b.branch(id_head)

    b.position_at_end(bag_end)
    mean = b.and_(b.icmp_signed("!=", a["is_mean"], I64(0)), b.icmp_signed(">", n, I64(0)))
    b.cbranch(mean, bag_mean, bag_store)

    b.position_at_end(bag_mean)
    averaged = b.fdiv(acc, _splat(b, b.sitofp(n, F32), width))
    b.branch(bag_store)

    b.position_at_end(bag_store)
    result = b.phi(vec)
    result.add_incoming(acc, bag_end)
    result.add_incoming(averaged, bag_mean)
    out_row = b.add(a["out"], b.mul(s, a["out_stride"]))
    b.store(result, b.inttoptr(out_row, ir.PointerType(vec)), align=4)
    s.add_incoming(b.add(s, I64(1)), bag_store)
    pos.add_incoming(end, bag_store)
    bad.add_incoming(bad_in_bag, bag_store)
    b.branch(bag_head)

    b.position_at_end(done)
    b.ret(bad)
    return fn


def generated_loops() -> tuple[tuple[int, int], ...]:
    """``(kind, width)`` of every generated loop: each float kind at every block width, each
    quantized kind at its `quantized_widths`."""
    floats = tuple((k, w) for k in FLOAT_KINDS for w in block_widths())
    return floats + tuple((k, w) for k in QUANTIZED_KINDS for w in quantized_widths(k))


def _define_dispatch(module: ir.Module) -> ir.Function:
    """``jagbench_pool_block(kind, width, *args)``: a switch to the generated loop."""
    name = "jagbench_pool_block"
    fn = cgutils.get_or_insert_function(module, ir.FunctionType(I64, [I64] * (2 + len(_ARGS))), name)
    if not fn.is_declaration:
        return fn
    fn.linkage = "internal"
    kind, width, *args = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    code = b.add(b.mul(kind, I64(1 << 16)), width)
    unknown = fn.append_basic_block("unknown")
    switch = b.switch(code, unknown)
    for k, width_ in generated_loops():
        case = fn.append_basic_block(f"k{k}_w{width_}")
        switch.add_case(I64((k << 16) + width_), case)
        b.position_at_end(case)
        b.ret(b.call(_define(module, width_, k), args))
    b.position_at_end(unknown)
    b.ret(I64(UNKNOWN_BLOCK))
    return fn


# Returned by `pool_block` for a (kind, width) it has no loop for (a bug in the caller); the
# kernel turns it into an error instead of leaving that block of the output unwritten.
UNKNOWN_BLOCK = -2


def _pool_block_typer(typingctx, *args):  # noqa: ARG001 - numba's intrinsic signature
    if not all(isinstance(t, types.Integer) for t in args):
        return None

    def codegen(context, builder, sig, llargs):
        fn = _define_dispatch(builder.module)
        widened = [builder.zext(v, I64) if v.type.width < 64 else v for v in llargs]
        return builder.call(fn, widened)

    return types.int64(*args), codegen


@intrinsic
def pool_block(
    typingctx, kind, width, ids, lengths, n_samples, start, last, table, rows, row_bytes, qparams,
    weights, weight_step, ahead, is_mean, out, out_stride,
):  # fmt: skip
    """Pool one feature's bags for one column block of ``width`` (one of `block_widths`) of a
    table stored as ``kind``; the other arguments are those of the module docstring."""
    return _pool_block_typer(
        typingctx, kind, width, ids, lengths, n_samples, start, last, table, rows, row_bytes,
        qparams, weights, weight_step, ahead, is_mean, out, out_stride,
    )  # fmt: skip
