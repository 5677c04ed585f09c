"""decode_average_ (PayloadFormat.decode_average), the fused decode of the world's gathered payloads:
against the reference ``out.zero_(); fmt.decode_sum(gathered, out); out.div_(world)``, bit for bit on
CPU (flags and every entry, NaN payloads included), for valid payloads packed by PayloadFormat.pack
and hostile ones (random bytes, flipped bits, counts and flags out of range, indices outside the
bucket, non-finite values and scales under a finite flag, bad csr16 block counts, a wrong
checksum); never a write outside ``out``; opcheck; the compressors' aggregate and own_update; CUDA
against CPU (skipped without a GPU)."""

import itertools
import re
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradsieve
from conftest import requires_cuda
from gradsieve.compressor import BucketLayout
from gradsieve.wire import CODECS, CSR16_BLOCK, VALUE_CODECS, PayloadFormat

GUARD = 16
SENTINEL = -1234.5

VALUES = list(VALUE_CODECS)
INDEXES = ["int32", "csr16", "local"]
# (numel, k): an empty bucket, k = 0, k = numel, odd sizes, several csr16 blocks.
BUCKETS = [(0, 0), (10, 0), (37, 37), (1001, 13), (3 * CSR16_BLOCK + 5, 301)]
HOSTILE = ["random-bytes", "flipped-bits", "count-above", "count-negative", "flag", "index-outside",
           "index-negative", "nonfinite-value", "nonfinite-scale", "csr16-count-negative",
           "csr16-count-moved", "csr16-count-extra", "checksum-field", "nan-not-finite",
           "local-descriptor", "local-count", "local-field"]


def make_format(values: str, index: str, numel: int, k: int, checksum: bool) -> PayloadFormat:
    chunk = max(1, min(8, k)) if CODECS[values].scaled else 256  # 13 entries, chunk 8: a partial chunk
    return PayloadFormat(k, values, chunk, index, numel, checksum)


def pack_world(fmt: PayloadFormat, world: int, g: torch.Generator) -> torch.Tensor:
    rows = []
    for _ in range(world):
        indices = torch.randperm(fmt.numel, generator=g)[:fmt.entries]
        values = torch.randn(fmt.entries, generator=g) * 3
        valid = torch.rand(fmt.entries, generator=g) < 0.8  # some padding slots between entries
        rows.append(fmt.pack(torch.tensor(True), indices, values, valid)[0])
    return torch.stack(rows) if rows else torch.zeros(0, fmt.nbytes, dtype=torch.uint8)


def put(row: torch.Tensor, offset: int, value, dtype: torch.dtype) -> None:
    """Writes one value of ``dtype`` at byte ``offset`` of ``row`` (any alignment), when it fits."""
    raw = torch.tensor([value], dtype=dtype).view(torch.uint8)
    if 0 <= offset and offset + raw.numel() <= row.numel():
        row[offset:offset + raw.numel()] = raw


def corrupt(fmt: PayloadFormat, row: torch.Tensor, what: str, g: torch.Generator) -> None:
    """Makes ``row`` (one payload, changed in place) hostile in the way ``what`` names."""
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    n = row.numel()
    count = int(row[4:8].clone().view(torch.int32)) if n >= 8 else 0
    used = max(0, min(count, fmt.slots))
    index_at = fmt.header_bytes
    scales_at = index_at + fmt.index_bytes
    values_at = scales_at + 4 * fmt.num_scales
    size = fmt.codec.bits // 8
    slot = rand(0, max(used, 1))
    if what == "random-bytes":
        row.copy_(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8))
    elif what == "flipped-bits":
        for _ in range(rand(1, 6)):
            where = rand(0, max(n, 1))
            if n:
                row[where] ^= 1 << rand(0, 8)
    elif what == "count-above":
        put(row, 4, fmt.slots + rand(1, 1000), torch.int32)
    elif what == "count-negative":
        put(row, 4, -rand(1, 2**31 - 1), torch.int32)
    elif what == "flag":
        put(row, 0, rand(2, 2**31 - 1) * (1 if rand(0, 2) else -1), torch.int32)
    elif what == "index-outside":
        if fmt.index == "int32":
            put(row, index_at + 4 * slot, fmt.numel + rand(0, 5), torch.int32)
        elif fmt.numel % CSR16_BLOCK:  # an offset past the bucket's end in the last block
            blocks = fmt.blocks
            put(row, index_at, 0, torch.int32)  # every entry in the last block
            for b in range(1, blocks):
                put(row, index_at + 4 * b, used if b == blocks - 1 else 0, torch.int32)
            put(row, index_at + 4 * (blocks - 1), used, torch.int32)
            put(row, index_at + 4 * blocks + 2 * slot, -1, torch.int16)  # offset 65535
    elif what == "index-negative":
        if fmt.index == "int32":
            put(row, index_at + 4 * slot, -rand(1, 2**31 - 1), torch.int32)
    elif what in ("nonfinite-value", "nan-not-finite"):
        bad = [float("nan"), float("inf"), float("-inf")][rand(0, 3)]
        if fmt.codec.scaled:
            put(row, scales_at + 4 * rand(0, max(fmt.num_scales, 1)), bad, torch.float32)
        else:
            put(row, values_at + size * slot, bad, fmt.codec.dtype)
        if what == "nan-not-finite":  # a non-finite gradient said so: finite, not malformed
            put(row, 0, 0, torch.int32)
    elif what == "nonfinite-scale":
        if fmt.codec.scaled:
            put(row, scales_at + 4 * rand(0, max(fmt.num_scales, 1)), float("nan"), torch.float32)
    elif what.startswith("local") and fmt.index == "local":
        layout = fmt.local
        if what == "local-descriptor":
            put(row, index_at, [0, 16, 255, 257, layout.descriptor + 1][rand(0, 5)], torch.int32)
        elif what == "local-count" and layout.chunks:
            c = rand(0, layout.chunks)
            put(row, index_at + 4 + 2 * c, rand(0, 1 << 16) - (1 << 15), torch.int16)
        elif row.numel() > index_at + 4 + layout.counts_bytes:  # a byte of the offsets or the bitmap
            where = index_at + 4 + layout.counts_bytes + rand(0, layout.offsets_bytes)
            row[where] = rand(0, 256)
    elif what.startswith("csr16-count") and fmt.index == "csr16" and fmt.blocks:
        b = rand(0, fmt.blocks)
        old = int(row[index_at + 4 * b:index_at + 4 * b + 4].clone().view(torch.int32))
        if what == "csr16-count-negative":
            put(row, index_at + 4 * b, -rand(1, 100), torch.int32)
        elif what == "csr16-count-extra":
            put(row, index_at + 4 * b, old + rand(1, 5), torch.int32)
        elif fmt.blocks > 1:  # moved between blocks: the sum still matches
            c = (b + 1) % fmt.blocks
            moved = min(old, rand(1, 4))
            other = int(row[index_at + 4 * c:index_at + 4 * c + 4].clone().view(torch.int32))
            put(row, index_at + 4 * b, old - moved, torch.int32)
            put(row, index_at + 4 * c, other + moved, torch.int32)
    elif what == "checksum-field":
        put(row, 8, rand(-2**31, 2**31 - 1), torch.int32)
    if fmt.checksum and what not in ("checksum-field", "random-bytes", "flipped-bits") and rand(0, 2):
        # Half the time the checksum is made right again, so the other checks are reached.
        fixed = row.clone()
        fixed[8:12] = 0
        put(row, 8, int(gradsieve.wire.checksum_of(fixed.view(1, -1))[0]), torch.int32)


def reference(fmt: PayloadFormat, gathered: torch.Tensor, divisor: float):
    out = torch.zeros(fmt.numel)
    finite, well_formed = fmt.decode_sum(gathered, out)
    return out.div_(divisor), finite, well_formed


def fused(fmt: PayloadFormat, gathered: torch.Tensor, divisor: float):
    """decode_average into the middle of a larger buffer full of garbage; checks the guards."""
    big = torch.full((fmt.numel + 2 * GUARD,), SENTINEL, device=gathered.device)
    out = big[GUARD:GUARD + fmt.numel]
    out.fill_(float("nan"))  # overwritten, not added to
    finite, well_formed = fmt.decode_average(gathered, out, divisor)
    guards = torch.cat([big[:GUARD], big[-GUARD:]]).cpu()
    assert torch.equal(guards, torch.full((2 * GUARD,), SENTINEL)), "wrote outside out"
    return out, finite, well_formed


def assert_bitwise(got, want):
    out, finite, well_formed = got
    ref_out, ref_finite, ref_well_formed = want
    assert finite.dtype == torch.bool and well_formed.dtype == torch.bool
    assert finite.tolist() == ref_finite.tolist()
    assert well_formed.tolist() == ref_well_formed.tolist()
    # Every bit of every number; NaN where the reference has NaN. A NaN's own bits may differ
    # where two NaNs met in a sum: which one x86's add keeps is the compiler's choice of operand
    # order (the reference's float and int8 paths already keep different ones).
    nan = torch.isnan(out)
    assert torch.equal(nan, torch.isnan(ref_out))
    mismatch = ((out.view(torch.int32) != ref_out.view(torch.int32)) & ~nan).nonzero().flatten()
    assert mismatch.numel() == 0, (f"{mismatch.numel()} entries differ, first at {mismatch[:5].tolist()}: "
                                   f"{out[mismatch[:5]].tolist()} vs {ref_out[mismatch[:5]].tolist()}")


# ---------------------------------------------------------------------------------- the grid
@pytest.mark.parametrize("numel, k", BUCKETS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("values", VALUES)
def test_matches_decode_sum_bitwise(values, index, checksum, world, numel, k):
    """Valid payloads, then the same with every rank made hostile in a different way."""
    fmt = make_format(values, index, numel, k, checksum)
    seed = zlib.crc32(repr((values, index, checksum, world, numel, k)).encode())
    g = torch.Generator().manual_seed(seed)
    gathered = pack_world(fmt, world, g)
    want = reference(fmt, gathered, world)
    assert want[1].all() and want[2].all()
    assert_bitwise(fused(fmt, gathered, world), want)
    hostile = gathered.clone()
    for r in range(world):
        corrupt(fmt, hostile[r], HOSTILE[(seed + r) % len(HOSTILE)], g)
    assert_bitwise(fused(fmt, hostile, world), reference(fmt, hostile, world))


@pytest.mark.parametrize("what", HOSTILE)
@pytest.mark.parametrize("values, index", [("fp32", "int32"), ("bf16", "csr16"), ("int8", "csr16"),
                                           ("fp16", "int32"), ("int8", "int32")])
def test_each_kind_of_hostile_payload(values, index, what):
    """Rank 1 of 3 is hostile: the flags and sums are decode_sum's, over several seeds."""
    numel = 2 * CSR16_BLOCK + 77
    for seed, checksum in itertools.product(range(3), (False, True)):
        fmt = make_format(values, index, numel, 61, checksum)
        g = torch.Generator().manual_seed(seed)
        gathered = pack_world(fmt, 3, g)
        corrupt(fmt, gathered[1], what, g)
        want = reference(fmt, gathered, 3)
        assert want[2][0] and want[2][2]
        assert_bitwise(fused(fmt, gathered, 3), want)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.sampled_from(VALUES), index=st.sampled_from(INDEXES), checksum=st.booleans(),
       numel=st.integers(0, 140_000), density=st.floats(0.0, 0.05), world=st.integers(1, 4),
       seed=st.integers(0, 2**31), flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)),
                                                   max_size=8))
def test_fuzz_matches_decode_sum(values, index, checksum, numel, density, world, seed, flips):
    k = min(numel, int(density * numel))
    fmt = make_format(values, index, numel, k, checksum)
    g = torch.Generator().manual_seed(seed)
    gathered = pack_world(fmt, world, g)
    for position, byte in flips:
        if fmt.nbytes:
            gathered[position % world, (position // world) % fmt.nbytes] = byte
    assert_bitwise(fused(fmt, gathered, world), reference(fmt, gathered, world))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.sampled_from(VALUES), index=st.sampled_from(INDEXES), checksum=st.booleans(),
       world=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_random_bytes_match_decode_sum(values, index, checksum, world, seed):
    fmt = make_format(values, index, 70_001, 40, checksum)
    g = torch.Generator().manual_seed(seed)
    gathered = torch.randint(0, 256, (world, fmt.nbytes), generator=g, dtype=torch.uint8)
    if seed % 2:  # plausible headers, so the checks past the header are reached
        gathered[:, :8] = torch.tensor([1, 0, 0, 0, seed % 41, 0, 0, 0], dtype=torch.uint8)
    assert_bitwise(fused(fmt, gathered, world), reference(fmt, gathered, world))


@pytest.mark.parametrize("values", ["int8", "int4", "int2", "sign"])
def test_a_slot_not_in_use_under_a_nan_scale_adds_nan_at_index_0_as_decode_sum(values):
    """A slot past the count decodes to index 0 with value 0 * scale: NaN when the scale is NaN."""
    fmt = PayloadFormat(6, values, 4, "int32", 100)  # 2 scales, the second one for slots 4 and 5
    valid = torch.tensor([True, True, True, True, True, False])
    payload, _ = fmt.pack(torch.tensor(False), torch.tensor([7, 8, 9, 10, 11, 0]), torch.ones(6), valid)
    assert int(payload[4:8].view(torch.int32)) == 5
    payload[fmt.header_bytes + fmt.index_bytes + 4:fmt.header_bytes + fmt.index_bytes + 8] = \
        torch.tensor([float("nan")]).view(torch.uint8)
    want = reference(fmt, payload.view(1, -1), 1)
    assert torch.isnan(want[0][0])
    assert_bitwise(fused(fmt, payload.view(1, -1), 1), want)


@pytest.mark.parametrize("divisor", [1, 3, 7.5])
def test_divisor_is_a_true_division(divisor):
    fmt = PayloadFormat(50, "fp32", 256, "int32", 500)
    gathered = pack_world(fmt, 3, torch.Generator().manual_seed(1))
    assert_bitwise(fused(fmt, gathered, divisor), reference(fmt, gathered, divisor))


def test_odd_payload_size_and_a_non_contiguous_gathered():
    """int8 payloads of an odd size (rows start at any byte) and a gathered that is a column slice."""
    fmt = PayloadFormat(13, "int8", 1, "int32", 1000)
    assert fmt.nbytes % 2 == 1
    gathered = pack_world(fmt, 3, torch.Generator().manual_seed(2))
    wide = torch.zeros(3, fmt.nbytes + 5, dtype=torch.uint8)
    wide[:, 2:2 + fmt.nbytes] = gathered
    sliced = wide[:, 2:2 + fmt.nbytes]
    assert not sliced.is_contiguous()
    assert_bitwise(fused(fmt, sliced, 3), reference(fmt, gathered, 3))


# ------------------------------------------------------------------------------ the compressors
@pytest.mark.parametrize("name, options", [
    ("topk", dict(density=0.05)), ("topk", dict(density=0.05, values="int8", chunk=16, index="csr16")),
    ("topk", dict(density=0.2, values="bf16", checksum=True, scope="layer")),
    ("dgc", dict(density=0.05, values="fp16")), ("regtopk", dict(density=0.05)),
])
def test_aggregate_and_own_update_are_the_reference(name, options):
    compressor = gradsieve.get_compressor(name, **options)
    layout = BucketLayout.flat(70_003, 3, [70_000, 3])
    g = torch.Generator().manual_seed(3)
    compressed = []
    for _ in range(3):
        memory = gradsieve.memory.MemoryBank().get(0, layout.keys, layout.param_numels,
                                                   compressor.memory_names, torch.device("cpu"),
                                                   compressor.memory_dtypes)
        compressed.append(compressor.compress(torch.randn(layout.numel, generator=g), memory, layout, 0))
    gathered = torch.stack([c.payload for c in compressed])
    fmt = compressor.payload_format(layout, 0)
    agg = compressor.aggregate(gathered, layout, 0)
    assert_bitwise((agg.average, agg.finite, agg.well_formed), reference(fmt, gathered, 3))
    own = compressor.own_update(compressed[1], layout, 0)
    assert_bitwise((own.average, own.finite, own.well_formed), reference(fmt, gathered[1:2].clone(), 1))


# ------------------------------------------------------------------------------ the op contract
def sample_args(values="int8", index="csr16", checksum=True, numel=CSR16_BLOCK + 9, world=3):
    fmt = make_format(values, index, numel, 24, checksum)
    gathered = pack_world(fmt, world, torch.Generator().manual_seed(4))
    return (torch.empty(numel), gathered, fmt.slots, values, fmt.chunk, index, checksum,
            float(world))


@pytest.mark.parametrize("values, index, checksum", [("fp32", "int32", False), ("int8", "csr16", True),
                                                     ("bf16", "csr16", False), ("int4", "int32", True),
                                                     ("int2", "csr16", False), ("sign", "int32", False),
                                                     ("int4", "local", True), ("fp32", "local", False)])
def test_opcheck(values, index, checksum):
    torch.library.opcheck(torch.ops.gradsieve.decode_average_.default,
                          sample_args(values, index, checksum),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_static"))


@pytest.mark.slow
def test_opcheck_dynamic_shapes():
    result = torch.library.opcheck(torch.ops.gradsieve.decode_average_.default,
                                   sample_args("fp16", "csr16", True), test_utils="test_aot_dispatch_dynamic",
                                   raise_exception=False)
    assert result["test_aot_dispatch_dynamic"] == "SUCCESS", str(result["test_aot_dispatch_dynamic"])[:500]


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    fmt = make_format("int8", "csr16", CSR16_BLOCK + 9, 24, True)
    gathered = pack_world(fmt, 3, torch.Generator().manual_seed(5))

    def average(g):
        out = torch.empty(fmt.numel)
        finite, well_formed = fmt.decode_average(g, out, 3)
        return out, finite, well_formed

    compiled = torch.compile(average, fullgraph=True, backend="aot_eager")
    assert_bitwise(compiled(gathered), average(gathered))


def _args(**change):
    args = dict(zip(["out", "gathered", "slots", "values", "chunk", "index", "checksum", "divisor"],
                    sample_args("int8", "csr16", True)))
    args.update(change)
    return list(args.values())


@pytest.mark.parametrize("change, message", [
    (dict(out=torch.empty(CSR16_BLOCK + 9, dtype=torch.float64)), "out must be a float32 tensor, got Double"),
    (dict(out=lambda device: torch.empty(2 * CSR16_BLOCK + 18, device=device)[::2]), "out must be contiguous"),
    (dict(gathered=torch.zeros(3, 10, dtype=torch.int32)), "gathered must be a 2-D uint8 tensor"),
    (dict(gathered=torch.zeros(3, 10, dtype=torch.uint8)), "gathered must have"),
    (dict(slots=-1), "slots must be in [0, 2^31 - 1], got -1"),
    (dict(values="fp64"), "values must be one of 'fp32', 'fp16', 'bf16', 'int8', 'int4', 'int2', 'sign', "
                          "got 'fp64'"),
    (dict(chunk=0), "chunk must be in [1, 2^20] with int8 values, got 0"),
    (dict(chunk=5), "gathered must have"),
    (dict(index="int16"), "index must be 'int32', 'csr16' or 'local', got 'int16'"),
    (dict(divisor=0.0), "divisor must be a finite number > 0, got 0"),
    (dict(divisor=float("nan")), "divisor must be a finite number > 0, got nan"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_argument_errors_name_the_argument(change, message, device):
    args = [a.to(device) if isinstance(a, torch.Tensor) else a(device) if callable(a) else a
            for a in _args(**change)]
    with pytest.raises(RuntimeError, match="gradsieve.decode_average_: " + re.escape(message)):
        torch.ops.gradsieve.decode_average_(*args)


def test_decode_average_refuses_wrong_shapes_with_value_error():
    fmt = make_format("fp32", "csr16", 1000, 10, False)
    with pytest.raises(ValueError, match=r"decode_average: expected uint8 payloads of \d+ bytes"):
        fmt.decode_average(torch.zeros(2, fmt.nbytes + 4, dtype=torch.uint8), torch.empty(1000), 2)
    gathered = torch.zeros(2, fmt.nbytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="out must be a contiguous float32 tensor"):
        fmt.decode_average(gathered, torch.empty(1000, dtype=torch.float16), 2)
    with pytest.raises(ValueError, match="out must have the bucket's 1000 entries, got 999"):
        fmt.decode_average(gathered, torch.empty(999), 2)


# ---------------------------------------------------------------------------------------- CUDA
@requires_cuda
@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("values", VALUES)
def test_cuda_matches_cpu(values, index, checksum):
    """Flags equal; sums equal where at most two entries meet (the atomics' order then does not
    matter), else within float rounding; valid and hostile payloads, odd payload sizes included."""
    for world, (numel, k) in itertools.product([1, 2, 3, 4], BUCKETS):
        fmt = make_format(values, index, numel, k, checksum)
        seed = zlib.crc32(repr((values, index, checksum, world, numel, k)).encode())
        g = torch.Generator().manual_seed(seed)
        gathered = pack_world(fmt, world, g)
        hostile = gathered.clone()
        for r in range(world):
            corrupt(fmt, hostile[r], HOSTILE[(seed + r) % len(HOSTILE)], g)
        for payloads, exact in ((gathered, world <= 2), (hostile, False)):
            want = fused(fmt, payloads, world)
            got = fused(fmt, payloads.cuda(), world)
            assert got[1].cpu().tolist() == want[1].tolist()
            assert got[2].cpu().tolist() == want[2].tolist()
            if exact:
                assert torch.equal(got[0].cpu().view(torch.int32), want[0].view(torch.int32))
            else:
                torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-5, atol=1e-5, equal_nan=True)


@requires_cuda
def test_cuda_opcheck():
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in sample_args("fp16", "int32", True)]
    torch.library.opcheck(torch.ops.gradsieve.decode_average_.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@requires_cuda
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.sampled_from(VALUES), index=st.sampled_from(INDEXES), checksum=st.booleans(),
       world=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_cuda_random_bytes_flags_match_cpu(values, index, checksum, world, seed):
    fmt = make_format(values, index, 70_001, 40, checksum)
    g = torch.Generator().manual_seed(seed)
    gathered = torch.randint(0, 256, (world, fmt.nbytes), generator=g, dtype=torch.uint8)
    gathered[:, :8] = torch.tensor([1, 0, 0, 0, seed % 41, 0, 0, 0], dtype=torch.uint8)
    want = fused(fmt, gathered, world)
    got = fused(fmt, gathered.cuda(), world)
    assert got[1].cpu().tolist() == want[1].tolist() and got[2].cpu().tolist() == want[2].tolist()
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-5, atol=1e-5, equal_nan=True)
