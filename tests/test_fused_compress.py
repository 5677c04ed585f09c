"""The fused compress-side ops against their references, bit for bit, and the topk, ef21 and dgc
compressors against their code before the fusion.

* ``pack_payload`` (and ``PayloadFormat.pack``) against ``PayloadFormat.pack_reference``, the
  plain-torch body of ``pack``;
* ``ef21_topk``, ``ef21_commit``, ``dgc_accumulate`` and ``dgc_mask_`` against the eager torch
  lines they replace;
* ``topk``, ``ef21`` and ``dgc``: over several steps of the Simulator, the payloads, the values
  sent, the pending memory, the memory after commit and the results equal those of copies of the
  pre-fusion ``select``/``commit``/``compress`` bodies kept here (``Old*`` classes).
"""

import math

import pytest
import torch

from conftest import DTYPES, devices, make_input, requires_cuda
from gradsieve import ops
from gradsieve.compressor import Compressed, Selection, ef_select, per_segment
from gradsieve.compressors.dgc import DGCCompressor
from gradsieve.compressors.ef21 import EF21Compressor
from gradsieve.compressors.topk import TopKCompressor
from gradsieve.simulator import Simulator
from gradsieve.wire import CODECS, VALUE_CODECS, PayloadFormat


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns (so NaN payloads and the sign of zero count)."""
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    return t


def assert_same(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.device == b.device, f"{what}: device {a.device} != {b.device}"
    if not torch.equal(bits(a.contiguous()), bits(b.contiguous())):
        diff = (bits(a.contiguous()) != bits(b.contiguous())).nonzero().reshape(-1)[:5].tolist()
        raise AssertionError(f"{what}: differ at {diff}")


# ----------------------------------------------------------------------------------- pack_payload
def ordered_entries(k, numel, padding, seed, device="cpu", special=False):
    """K entries valid first in ascending position order (the last `padding` slots padding, at
    position 0 with some value), as the compressors hand them to the wire."""
    g = torch.Generator().manual_seed(seed)
    used = k - padding
    positions = torch.randperm(numel, generator=g)[:used].sort().values
    indices = torch.cat([positions, torch.zeros(padding, dtype=torch.int64)])
    values = torch.randn(k, generator=g) * 4
    if special and used > 4:
        values[1], values[2], values[3] = math.nan, math.inf, -0.0
    valid = torch.arange(k) < used if padding or special else None
    return indices.to(device), values.to(device), None if valid is None else valid.to(device)


PACK_CASES = [  # (k, numel, padding)
    (0, 10, 0), (1, 1, 0), (7, 100, 0), (7, 100, 3), (300, 70_000, 0), (513, 200_000, 17),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("values", VALUE_CODECS)
@pytest.mark.parametrize("index", ["int32", "csr16", "local"])
@pytest.mark.parametrize("k,numel,padding", PACK_CASES)
def test_pack_payload_matches_pack_reference(device, values, index, k, numel, padding):
    for chunk, checksum, special in ((256, False, False), (5, True, True), (1, False, True)):
        indices, vals, valid = ordered_entries(k, numel, padding, seed=k + numel, device=device,
                                               special=special)
        fmt = PayloadFormat(k, values, max(1, min(chunk, k)), index, numel, checksum)
        finite = torch.tensor(not special, device=device)
        ref_payload, ref_sent = fmt.pack_reference(finite, indices, vals, valid, ordered=True)
        payload, sent = fmt.pack(finite, indices, vals, valid, ordered=True)
        assert_same(payload, ref_payload, f"payload ({values}, {index}, chunk {chunk})")
        assert_same(sent, ref_sent, "sent")
        # The op itself (no checksum written: the field stays zero).
        raw, raw_sent = ops.pack_payload(finite, indices, vals, valid, values, fmt.chunk,
                                         index, numel, checksum)
        assert_same(raw_sent, ref_sent, "sent of the op")
        if checksum:
            raw[8:12] = ref_payload[8:12]
        assert_same(raw, ref_payload, "payload of the op")


def test_pack_payload_int32_without_valid_needs_no_order():
    # int32 indices with no valid mask go on the wire as given (no sort), so pack fuses them too.
    indices = torch.tensor([9, 2, 5, 0])
    vals = torch.tensor([1.0, -2.0, 3.5, 0.25])
    fmt = PayloadFormat(4, "int8", 3, "int32", 10)
    ref = fmt.pack_reference(torch.tensor(True), indices, vals, None, ordered=False)
    got = fmt.pack(torch.tensor(True), indices, vals, None, ordered=False)
    assert_same(got[0], ref[0]), assert_same(got[1], ref[1])


@pytest.mark.parametrize("device", devices())
def test_pack_payload_non_contiguous_and_int32_indices(device):
    indices, vals, valid = ordered_entries(301, 150_000, 20, seed=9, device=device)
    indices2 = torch.stack([indices, indices]).t().reshape(-1)[::2]
    vals2 = torch.stack([vals, vals]).t().reshape(-1)[::2]
    valid2 = torch.stack([valid, valid]).t().reshape(-1)[::2]
    assert not vals2.is_contiguous() or vals2.stride() != (1,)
    for index in ("int32", "csr16", "local"):
        fmt = PayloadFormat(301, "bf16", 256, index, 150_000)
        ref = fmt.pack_reference(torch.tensor(True, device=device), indices, vals, valid, ordered=True)
        for idx in (indices2, indices2.to(torch.int32)):
            got = ops.pack_payload(torch.tensor(True, device=device), idx, vals2, valid2, "bf16",
                                   256, index, 150_000)
            assert_same(got[0], ref[0]), assert_same(got[1], ref[1])


def test_pack_payload_decodes():
    indices, vals, valid = ordered_entries(100, 140_000, 10, seed=10)
    fmt = PayloadFormat(100, "fp16", 256, "csr16", 140_000)
    payload, sent = fmt.pack(torch.tensor(True), indices, vals, valid, ordered=True)
    out = torch.zeros(140_000)
    finite, well_formed = fmt.decode_sum(payload.view(1, -1), out)
    assert bool(finite.all()) and bool(well_formed.all())
    expected = torch.zeros(140_000).index_add_(0, indices[:90], sent[:90])
    assert_same(out, expected)


def test_pack_payload_checks_its_arguments():
    t, i, v = torch.tensor(True), torch.tensor([1, 2]), torch.tensor([1.0, 2.0])
    with pytest.raises(RuntimeError, match=r"pack_payload: values must be a 1-D float32 tensor, got Half"):
        ops.pack_payload(t, i, v.half(), None, "fp16", 1, "int32", 4)
    with pytest.raises(RuntimeError, match=r"pack_payload: index must be 'int32', 'csr16' or 'local', got 'csr8'"):
        ops.pack_payload(t, i, v, None, "fp16", 1, "csr8", 4)
    with pytest.raises(RuntimeError, match=r"pack_payload: wire must be one of 'fp32', 'fp16', 'bf16', 'int8', "
                                           r"'int4', 'int2', 'sign', got 'int16'"):
        ops.pack_payload(t, i, v, None, "int16", 1, "int32", 4)
    with pytest.raises(RuntimeError, match=r"pack_payload: finite must be a bool tensor of one element"):
        ops.pack_payload(torch.tensor(1), i, v, None, "fp32", 1, "int32", 4)
    with pytest.raises(RuntimeError, match=r"pack_payload: valid must have as many elements as values"):
        ops.pack_payload(t, i, v, torch.ones(3, dtype=torch.bool), "fp32", 1, "int32", 4)
    with pytest.raises(RuntimeError, match=r"pack_payload: chunk must be in \[1, 2\^20\], got 0"):
        ops.pack_payload(t, i, v, None, "int4", 0, "int32", 4)


# ------------------------------------------------------------------- ef21 and dgc's own fused ops
SIZES = [(0, 0), (1, 0), (1, 1), (17, 0), (17, 17), (1001, 37), (4099, 1000)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SIZES)
def test_ef21_topk_matches_topk_of_the_change(device, dtype, n, k):
    for kind in ("normal", "special", "ties"):
        grad = make_input(n, dtype, device, kind, seed=11)
        estimate = make_input(n, torch.float32, device, "ties" if kind == "ties" else "normal", seed=12)
        values, indices = ops.topk_abs(grad - estimate, k)
        got = ops.ef21_topk(grad, estimate, k)
        if dtype == torch.float16:
            # torch widens a float16 NaN to float32 with one payload in its scalar path and another
            # in its vector path; only the NaN payloads may differ.
            nan = torch.isnan(values)
            assert torch.equal(torch.isnan(got[0]), nan)
            values, got = values[~nan], (got[0][~nan],) + tuple(got[1:])
        assert_same(got[0], values), assert_same(got[1], indices)
        assert_same(got[2], torch.isfinite(grad).all())


@pytest.mark.parametrize("device", devices())
def test_ef21_commit_matches_index_add_and_add(device):
    n, k = 5003, 77
    estimate, global_estimate = make_input(n, device=device, seed=13), make_input(n, device=device, seed=14)
    average = make_input(n, device=device, kind="special", seed=15)
    indices = torch.randperm(n)[:k].sort().values.to(device)
    change = make_input(k, device=device, seed=16)
    ref_estimate = estimate.clone().index_add_(0, indices, change)
    ref_global = global_estimate + average
    got = ops.ef21_commit(estimate[None].expand(2, n)[0], indices, change, global_estimate, average)
    assert_same(got[0], ref_estimate), assert_same(got[1], ref_global), assert_same(got[2], ref_global)
    assert got[1].data_ptr() != got[2].data_ptr()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_dgc_accumulate_matches_eager(device, dtype, momentum):
    n = 4099
    for kind in ("normal", "special"):
        grad = make_input(n, dtype, device, kind, seed=17)
        u0 = make_input(2 * n, device=device, seed=18)[::2]
        v0 = make_input(n, device=device, seed=19)
        for scale in (None, torch.tensor(0.37, device=device)):
            g = grad.float() if scale is None else grad.float() * scale
            u = u0 * momentum + g
            got = ops.dgc_accumulate(grad, u0, v0, momentum, scale)
            assert_same(got[0], u), assert_same(got[1], v0 + u)
            assert_same(got[2], torch.isfinite(grad).all())


@pytest.mark.parametrize("device", devices())
def test_dgc_mask_matches_the_keep_product(device):
    n = 1000
    u = make_input(n, device=device, kind="special", seed=20)
    v = make_input(n, device=device, kind="special", seed=21)
    indices = torch.tensor([5, 0, 999, 17, 0, 3], device=device)
    sent = torch.tensor([True, False, True, True, False, True], device=device)
    safe = torch.where(sent, indices, 0)
    keep = torch.ones_like(v)
    keep.scatter_reduce_(0, safe, sent.logical_not().to(v.dtype), reduce="amin")
    ref_u, ref_v = u * keep, v * keep
    ops.dgc_mask_(u, v, safe, sent)
    assert_same(u, ref_u), assert_same(v, ref_v)


# ---------------------------------------------------------------------------------------- opcheck
def opcheck_samples():
    n, k = 300, 7
    residual, grad = make_input(n, seed=22), make_input(n, seed=23)
    indices, vals, valid = ordered_entries(9, 70_000, 2, seed=24)
    yield ops.pack_payload, torch.ops.gradsieve.pack_payload.default, (
        torch.tensor(True), indices, vals, valid, "int8", 4, "csr16", 70_000, True)
    yield ops.pack_payload, torch.ops.gradsieve.pack_payload.default, (
        torch.tensor(True), indices, vals, None, "fp16", 1, "int32", 70_000, False)
    yield ops.pack_payload, torch.ops.gradsieve.pack_payload.default, (
        torch.tensor(True), indices, vals, valid, "int2", 3, "int32", 70_000, False)
    yield ops.pack_payload, torch.ops.gradsieve.pack_payload.default, (
        torch.tensor(True), indices, vals, valid, "sign", 4, "csr16", 70_000, True)
    yield ops.pack_payload, torch.ops.gradsieve.pack_payload.default, (
        torch.tensor(True), indices, vals, valid, "int4", 4, "local", 70_000, True)
    yield ops.ef21_topk, torch.ops.gradsieve.ef21_topk.default, (grad, residual, k)
    yield ops.ef21_commit, torch.ops.gradsieve.ef21_commit.default, (
        residual, torch.tensor([3, 9]), torch.tensor([1.0, 2.0]), grad, residual)
    yield ops.dgc_accumulate, torch.ops.gradsieve.dgc_accumulate.default, (
        grad, residual, residual, 0.9, torch.tensor(0.5))
    yield ops.dgc_mask_, torch.ops.gradsieve.dgc_mask_.default, (
        residual.clone(), grad.clone(), torch.tensor([3, 0]), torch.tensor([True, False]))


@pytest.mark.parametrize("sample", list(range(6)))
def test_opcheck(sample):
    _, op, args = list(opcheck_samples())[sample]
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------- the compressors, before and after
def old_compress(self, grad, memory, layout, step):
    """SparseCompressor.compress before the fusion: its own isfinite pass, the plain-torch pack."""
    segments = self.segments(layout, step)
    fmt = self._format(sum(s.k for s in segments), layout.numel)
    finite = torch.isfinite(grad).all()
    selection = self.select(grad, memory, segments, layout, step)
    valid = selection.scratch.get("valid")
    ordered = self.traits.ascending and (len(segments) == 1 or valid is None)
    payload, sent = fmt.pack_reference(finite, selection.indices, selection.values, valid, ordered)
    if self.values != "fp32":
        self.absorb_rounding(selection, selection.values - sent)
    selection.scratch["wire_values"] = sent
    return Compressed(payload, selection.pending, selection.scratch)


class OldTopK(TopKCompressor):
    compress = old_compress

    def select(self, grad, memory, segments, layout, step):
        residual = memory.entries["residual"].clone()
        indices, values = ef_select(residual, grad, segments, ops)
        return Selection(indices, values, {"residual": residual}, {})


class OldEF21(EF21Compressor):
    compress = old_compress

    def select(self, grad, memory, segments, layout, step):
        estimate = memory.entries["estimate"]
        change = grad - estimate
        indices, values = per_segment(segments, lambda _, piece, k: ops.topk_abs(change[piece], k))
        return Selection(indices, values, {"estimate": estimate.clone()}, {"indices": indices, "change": values})

    def commit(self, memory, compressed, average, layout):
        estimate = compressed.pending["estimate"]
        # (For the comparison: the old commit writes into its pending estimate.)
        compressed.scratch["pending_before_commit"] = {"estimate": estimate.clone()}
        estimate.index_add_(0, compressed.scratch["indices"], compressed.scratch["change"])
        memory.entries["estimate"] = estimate
        global_estimate = memory.entries["global_estimate"] + average
        memory.entries["global_estimate"] = global_estimate
        return global_estimate.clone()


class OldDGC(DGCCompressor):
    compress = old_compress

    def select(self, grad, memory, segments, layout, step):
        u = self._momentum(grad, memory, layout)
        v = memory.entries["velocity_v"] + u
        factor = memory.extra.get("threshold_factor")
        if factor is None or factor.numel() != len(layout.param_numels):
            factor = torch.ones(len(layout.param_numels), device=grad.device)
        new_factor = factor.clone()
        slots = self._factor_slots(layout, segments)
        parts_i, parts_v = [], []
        for seg, slot in zip(segments, slots):
            piece = v[seg.offset:seg.offset + seg.numel]
            if seg.k == seg.numel or self.sample_fraction == 0.0:
                values, indices = ops.topk_abs(piece, seg.k)
            else:
                threshold = self._threshold(piece, seg, factor[slot], layout, step)
                values, indices, count = ops.threshold_select(piece, threshold, seg.k)
                valid = torch.arange(seg.k, device=grad.device) < count
                values = torch.where(valid, values, torch.zeros_like(values))
                indices = torch.where(valid, indices, torch.full_like(indices, -1))
                too_few = count < seg.k
                new_factor[slot] = torch.where(too_few, factor[slot] * 0.7,
                                               torch.clamp(factor[slot] * 1.05, max=1.0))
            parts_i.append(torch.where(indices >= 0, indices + seg.offset, indices))
            parts_v.append(values)
        indices, values = torch.cat(parts_i), torch.cat(parts_v)
        sent = indices >= 0
        safe = torch.where(sent, indices, torch.zeros_like(indices))
        keep = torch.ones_like(v)
        keep.scatter_reduce_(0, safe, sent.logical_not().to(v.dtype), reduce="amin")
        u = u * keep
        v = v * keep
        return Selection(safe, values, {"momentum_u": u, "velocity_v": v, "threshold_factor": new_factor},
                         {"valid": sent})


PARAMS = dict(param_sizes=(3000, 7, 1, 70_000, 11), param_ndims=(2, 1, 1, 2, 1))


def run_both(new, old, steps, device="cpu", world=2, kinds=("normal",), scale=1.0, **layout):
    layout = {**PARAMS, **layout}
    numel = sum(layout["param_sizes"])
    sims = [Simulator(c, world_size=world, **layout) for c in (new, old)]
    for step in range(steps):
        kind = kinds[step % len(kinds)]
        grads = [make_input(numel, torch.float32, device, kind, seed=100 * step + w) * scale
                 for w in range(world)]
        results = [sim.step(grads) for sim in sims]
        assert_same(results[0], results[1], f"result of step {step}")
        for w in range(world):
            a, b = (sim.last_compressed[w] for sim in sims)
            assert_same(a.payload, b.payload, f"payload of worker {w}, step {step}")
            assert set(a.pending) == set(b.pending)
            for name in a.pending:
                before = b.scratch.get("pending_before_commit", {}).get(name, b.pending[name])
                assert_same(a.pending[name], before, f"pending {name}, step {step}")
            assert_same(a.scratch["wire_values"], b.scratch["wire_values"], "wire values")
            banks = [sim.banks[w].buckets[0] for sim in sims]
            for name in banks[1].entries:
                assert_same(banks[0].entries[name], banks[1].entries[name], f"memory {name}, step {step}")
            for name in banks[1].extra:
                assert_same(banks[0].extra[name], banks[1].extra[name], f"extra {name}, step {step}")
    return sims


SPARSE_VARIANTS = [
    dict(values="fp32", index="int32"),
    dict(values="int8", index="csr16", chunk=64, checksum=True),
    dict(values="bf16", index="csr16", scope="layer"),
    dict(values="fp16", index="int32", compress_1d=False),
]


@pytest.mark.parametrize("options", SPARSE_VARIANTS)
def test_topk_compressor_is_unchanged(options):
    run_both(TopKCompressor(density=0.01, **options), OldTopK(density=0.01, **options), steps=3)


@pytest.mark.parametrize("options", SPARSE_VARIANTS)
def test_ef21_compressor_is_unchanged(options):
    run_both(EF21Compressor(density=0.02, **options), OldEF21(density=0.02, **options), steps=3)


@pytest.mark.parametrize("options", SPARSE_VARIANTS)
@pytest.mark.parametrize("dgc", [dict(), dict(clip_norm=1.0, sample_fraction=0.0, momentum=0.5)])
def test_dgc_compressor_is_unchanged(options, dgc):
    run_both(DGCCompressor(density=0.01, **options, **dgc), OldDGC(density=0.01, **options, **dgc),
             steps=3)


@pytest.mark.parametrize("cls,old", [(TopKCompressor, OldTopK), (EF21Compressor, OldEF21),
                                     (DGCCompressor, OldDGC)])
def test_compressors_skip_non_finite_steps_alike(cls, old):
    # A non-finite gradient in the second step: its payload says so, the step is skipped and no
    # memory changes, as before.
    sims = run_both(cls(density=0.01), old(density=0.01), steps=3, kinds=("normal", "special"))
    assert sims[0].skipped_steps == sims[1].skipped_steps > 0


def test_select_reports_finiteness_once():
    topk = TopKCompressor(density=0.05, scope="layer")
    sim = Simulator(topk, world_size=1, **PARAMS)
    sim.step([make_input(sum(PARAMS["param_sizes"]), kind="special", seed=3)])
    scratch = sim.last_compressed[0].scratch
    assert scratch["finite"].dtype == torch.bool and not bool(scratch["finite"])
    assert sim.last_compressed[0].payload[:4].view(torch.int32).item() == 0


# ------------------------------------------------------------------------------------------- CUDA
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_ef21_topk_matches_cpu(dtype):
    n, k = 100_003, 1001
    residual, grad = make_input(n, seed=30), make_input(n, dtype, kind="special", seed=31)
    v, i = ops.topk_abs(grad.float() - residual, k)
    got = ops.ef21_topk(grad.cuda(), residual.cuda(), k)
    assert torch.equal(got[1].cpu(), i)


@requires_cuda
@pytest.mark.parametrize("values", VALUE_CODECS)
@pytest.mark.parametrize("index", ["int32", "csr16", "local"])
def test_cuda_pack_payload_matches_cuda_reference(values, index):
    indices, vals, valid = ordered_entries(1037, 300_000, 37, seed=32, device="cuda")
    fmt = PayloadFormat(1037, values, 64, index, 300_000, True)
    finite = torch.tensor(True, device="cuda")
    ref = fmt.pack_reference(finite, indices, vals, valid, ordered=True)
    got = fmt.pack(finite, indices, vals, valid, ordered=True)
    assert_same(got[0], ref[0]), assert_same(got[1], ref[1])


@requires_cuda
@pytest.mark.parametrize("cls,old", [(TopKCompressor, OldTopK), (EF21Compressor, OldEF21),
                                     (DGCCompressor, OldDGC)])
def test_cuda_compressors_are_unchanged(cls, old):
    for options in SPARSE_VARIANTS[:2]:
        run_both(cls(density=0.01, **options), old(density=0.01, **options), steps=2, device="cuda")


# --------------------------------------------------------------------- CUDA against the CPU kernels
# The CUDA kernels compute what the CPU kernels compute, bit for bit, except the bits of a NaN: a
# GPU's arithmetic (and its float16/bfloat16 casts) writes its own NaN pattern where the CPU keeps
# the operand's payload or writes its own default NaN. NaN must be NaN at the same entries.
def assert_same_but_nan_bits(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    a, b = a.cpu(), b.cpu()
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b)), f"{what}: NaN at different entries"
    assert_same(torch.where(nan, torch.zeros_like(a), a), torch.where(nan, torch.zeros_like(b), b), what)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SIZES + [(100_003, 1001)])
def test_cuda_ef21_topk_matches_cpu_kernel(dtype, n, k):
    for kind in ("normal", "special", "ties"):
        grad = make_input(n, dtype, kind=kind, seed=33)
        estimate = make_input(n, kind="ties" if kind == "ties" else "normal", seed=34)
        ref = ops.ef21_topk(grad, estimate, k)
        got = ops.ef21_topk(grad.cuda(), estimate.cuda(), k)
        assert got[0].is_cuda and got[2].is_cuda
        assert_same_but_nan_bits(got[0], ref[0], "values")
        assert_same(got[1].cpu(), ref[1], "indices")
        assert_same(got[2].cpu(), ref[2], "finite")


@requires_cuda
@pytest.mark.parametrize("values", VALUE_CODECS)
@pytest.mark.parametrize("index", ["int32", "csr16", "local"])
@pytest.mark.parametrize("k,numel,padding", PACK_CASES + [(1037, 300_000, 37)])
def test_cuda_pack_payload_matches_cpu_kernel(values, index, k, numel, padding):
    for chunk, checksum, special in ((64, True, False), (5, False, True), (1, False, True)):
        indices, vals, valid = ordered_entries(k, numel, padding, seed=k + 7, special=special)
        fmt = PayloadFormat(k, values, max(1, min(chunk, k)), index, numel, checksum)
        for idx in (indices, indices.to(torch.int32)):
            args = (values, fmt.chunk, index, numel, checksum)
            ref = ops.pack_payload(torch.tensor(not special), idx, vals, valid, *args)
            got = ops.pack_payload(torch.tensor(not special, device="cuda"), idx.cuda(), vals.cuda(),
                                   None if valid is None else valid.cuda(), *args)
            assert got[0].is_cuda and got[1].is_cuda
            assert_same_but_nan_bits(got[1], ref[1], "sent")
            payload, ref_payload = got[0].cpu(), ref[0]
            if values in ("fp16", "bf16") and special:
                # The header, index and values sections apart; the values up to NaN bits.
                start = fmt.header_bytes + fmt.index_bytes
                assert_same(payload[:start], ref_payload[:start], "header and index")
                dtype = CODECS[values].dtype
                assert_same_but_nan_bits(payload[start:].view(dtype), ref_payload[start:].view(dtype),
                                         "wire values")
            else:
                assert_same(payload, ref_payload, f"payload ({values}, {index}, chunk {chunk})")


@requires_cuda
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("n,k", [(0, 0), (1, 0), (1, 1), (5003, 77), (100_003, 1001)])
def test_cuda_ef21_commit_matches_cpu_kernel(index_dtype, n, k):
    estimate, global_estimate = make_input(n, seed=35), make_input(n, seed=36)
    average = make_input(n, kind="special", seed=37)
    g = torch.Generator().manual_seed(38)
    indices = torch.randperm(n, generator=g)[:k].sort().values.to(index_dtype)
    change = make_input(k, kind="special", seed=39)
    args = (estimate[None].expand(2, n)[0], indices, change, global_estimate, average)
    ref = ops.ef21_commit(*args)
    got = ops.ef21_commit(*(t.cuda() for t in args))
    for a, b, what in zip(got, ref, ("estimate", "global", "result")):
        assert a.is_cuda
        assert_same_but_nan_bits(a, b, what)
    assert n == 0 or got[1].data_ptr() != got[2].data_ptr()


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("n", [0, 1, 4099, 100_003])
def test_cuda_dgc_accumulate_matches_cpu_kernel(dtype, momentum, n):
    for kind in ("normal", "special"):
        grad = make_input(n, dtype, kind=kind, seed=40)
        u0 = make_input(2 * n, seed=41)[::2]
        v0 = make_input(n, kind=kind, seed=42)
        for scale in (None, torch.tensor(0.37)):
            ref = ops.dgc_accumulate(grad, u0, v0, momentum, scale)
            got = ops.dgc_accumulate(grad.cuda(), u0.cuda(), v0.cuda(), momentum,
                                     None if scale is None else scale.cuda())
            assert_same_but_nan_bits(got[0], ref[0], "u")
            assert_same_but_nan_bits(got[1], ref[1], "v")
            assert got[2].is_cuda
            assert_same(got[2].cpu(), ref[2], "finite")


@requires_cuda
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("with_valid", [False, True])
def test_cuda_dgc_mask_matches_cpu_kernel(index_dtype, with_valid):
    n = 1000
    u = make_input(2 * n, kind="special", seed=43)[::2]  # non-contiguous: masked through a copy
    v = make_input(n, kind="special", seed=44)
    # Duplicates, a padding slot at 0, and positions outside [0, n) (skipped).
    indices = torch.tensor([5, 0, 999, 17, 0, 3, 17, -1, 1000, 250], dtype=index_dtype)
    valid = torch.tensor([True, False, True, True, False, True, True, True, True, False])
    for idx, ok in ((indices, valid), (indices[:0], valid[:0])):
        ok = ok if with_valid else None
        ref_u, ref_v = u.clone(), v.clone()
        ops.dgc_mask_(ref_u, ref_v, idx, ok)
        got_u, got_v = u.cuda(), v.cuda()
        got_u = torch.stack([got_u, got_u]).t().reshape(-1)[::2]  # keep it non-contiguous
        ops.dgc_mask_(got_u, got_v, idx.cuda(), None if ok is None else ok.cuda())
        assert_same_but_nan_bits(got_u, ref_u, "u")
        assert_same_but_nan_bits(got_v, ref_v, "v")
