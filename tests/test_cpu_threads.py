"""The CPU ops on several threads: built with OpenMP, and the same bits on 1, 2 or 4 threads.

1. Every CPU op of gradsieve.ops on inputs large enough that ``at::parallel_for`` splits the work
   (2^20 + an odd number of entries: above every grain of csrc/cpu, and not a multiple of the
   chunks; payloads above sparse_accumulate_'s serial limit; more segments than segment_mean's
   grain; several ranks for csr16_indices), run under torch.set_num_threads(1), 2 and 4: every
   output, and every input an op changes in place, has the same bits each time. At 1 thread the
   outputs equal the plain-torch/NumPy references where the op has an exact one (the results of
   the serial build, which the references pinned down bit for bit).
2. The extension is built with OpenMP: gradsieve._C needs the OpenMP runtime torch runs with
   (DT_NEEDED and the omp_* symbols in its ELF dynamic section), the process maps one OpenMP
   runtime only, and an op on 2 threads runs on 2 OS threads.
"""

import math
import os
import subprocess
import struct
import sys
import threading
import time

import numpy as np
import pytest
import torch

import gradsieve
import reference
from conftest import make_input
from test_adaptive import reference_select

THREADS = [1, 2, 4]
N = (1 << 20) + 4099  # 16 chunks of 65536 and a partial one


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bytes (NaN payloads and signed zeros included), for exact comparisons."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_same_bits(what, got, want):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.equal(bits(got), bits(want)), what


def clone_all(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


# ------------------------------------------------------------------------------------ the cases
# Each case returns (run, check): run() calls the op on fresh copies of its inputs and returns
# every output and every input it changed in place; check(outputs) compares the 1-thread outputs
# with the op's reference (None where the op has no exact one).

def case_topk_abs(kind, dtype):
    x = make_input(N, dtype, kind=kind, seed=1)
    k = N // 97 if kind == "normal" else N // 3  # ties: the cut falls inside a run of equals

    def check(out):
        values, indices = out
        assert np.array_equal(indices.numpy(), reference.topk_indices(x, k))
        assert_same_bits("values", values, x[indices])
    return (lambda: gradsieve.topk_abs(x, k)), (check if kind != "special" else None)


def case_ef_topk_into(dtype):
    grad = make_input(N, dtype, seed=5)
    grad[N // 2] = float("inf")
    residual = make_input(N, seed=6) * 0.25
    k, scale = N // 50, 0.375

    def run():
        out = torch.empty(N)
        values, indices, finite = gradsieve.ef_topk_into(out, residual, grad, k, scale)
        return values, indices, out, finite

    def check(out):
        r = residual.clone()
        values, indices = gradsieve.ef_topk_(r, grad, k, scale)
        assert torch.equal(out[1], indices) and not bool(out[3])
        assert_same_bits("values", out[0], values)
        assert_same_bits("out", out[2], r)
    return run, check


def case_quantile_abs(kind, dtype):
    x = make_input(N, dtype, kind=kind, seed=2)

    def check(out):
        assert_same_bits("quantile", out[0], reference.quantile_abs(x, 0.9))
    return (lambda: (gradsieve.quantile_abs(x, 0.9),)), check


def case_ef_topk(dtype):
    grad = make_input(N, dtype, seed=3)
    residual = make_input(N, seed=4) * 0.25
    k, scale = N // 50, 0.375

    def run():
        r = residual.clone()
        values, indices = gradsieve.ef_topk_(r, grad, k, scale)
        return values, indices, r

    def check(out):
        values, indices, r = out
        acc = residual + scale * grad.float()
        want = torch.from_numpy(reference.topk_indices(acc, k))
        assert torch.equal(indices, want)
        assert_same_bits("values", values, acc[want])
        acc[want] = 0.0
        assert_same_bits("residual", r, acc)
    return run, check


def case_regtopk(previous):
    grad = make_input(N, seed=5)
    residual = make_input(N, kind="ties", seed=6) * 0.125
    k = N // 40
    if previous:  # last step's payload: duplicates, a cancelled entry, an out-of-range index
        g = torch.Generator().manual_seed(7)
        m = 40_000
        idx = torch.randint(0, N, (m,), generator=g)
        idx[:200] = idx[200:400]
        idx[-1] = N + 5
        sent = torch.randn(m, generator=g)
        agg = torch.randn(m, generator=g) * 0.5
        agg[1000:1100] = 0.0
        prev = (idx, sent, agg)
    else:
        prev = (torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0))

    def run():
        r = residual.clone()
        bad = torch.zeros(4, dtype=torch.int32)
        values, indices = gradsieve.regtopk_select_(r, grad, *prev, 1.5, k, 4,
                                                    0.25 if previous else None, bad)
        return values, indices, r, bad

    def check(out):  # the first step is ef_topk_ with scale 1
        values, indices, r, bad = out
        acc = residual + grad
        assert torch.equal(indices, torch.from_numpy(reference.topk_indices(acc, k)))
        assert_same_bits("values", values, acc[indices])
        acc[indices] = 0.0
        assert_same_bits("residual", r, acc)
        assert not bad.any()
    return run, (None if previous else check)


def case_threshold_select(overflow):
    x = make_input(N, kind="special", seed=8)
    threshold = torch.tensor(1.5)
    capacity = N // 20 if overflow else N // 5  # about 13% pass

    def check(out):
        values, indices, count = out
        want_v, want_i, want_c = reference.threshold_select(x, 1.5, capacity)
        assert int(count) == want_c and (want_c > capacity) == overflow
        assert np.array_equal(indices.numpy(), want_i)
        assert_same_bits("values", values, torch.where(torch.arange(capacity) < want_c,
                                                       x[indices], torch.zeros(())))
    return (lambda: gradsieve.threshold_select(x, threshold, capacity)), check


def case_quantize(stochastic, dtype, chunk):
    x = make_input(N, dtype, kind="special" if chunk == 1000 else "normal", seed=9)

    def run():
        g = torch.Generator().manual_seed(1234)
        return gradsieve.quantize_int8(x, chunk, stochastic=stochastic, generator=g)

    def check(out):
        want_q, want_s = reference.quantize_int8(x, chunk)
        assert_same_bits("scales", out[1], want_s)
        assert torch.equal(out[0], want_q)
    return run, (None if stochastic else check)


def case_dequantize(dtype):
    chunk = 512
    q, scales = gradsieve.quantize_int8(make_input(N, seed=10), chunk)

    def check(out):
        want = q.float() * scales.repeat_interleave(chunk)[:N]
        assert_same_bits("dequantized", out[0], want.to(dtype))
    return (lambda: (gradsieve.dequantize_int8(q, scales, chunk, dtype),)), check


def case_sparse_accumulate(values_kind, out_dtype):
    g = torch.Generator().manual_seed(11)
    m = 300_007  # above the serial limit (2^15) of the payload
    indices = torch.randint(0, N, (m,), generator=g)
    indices[: m // 4] = indices[m // 4: 2 * (m // 4)]  # many duplicates: order of the sums matters
    base = make_input(N, seed=12).to(out_dtype)
    chunk, scales, bad = 0, None, None
    if values_kind == "int8":
        chunk = 256
        values, scales = gradsieve.quantize_int8(make_input(m, seed=13), chunk)
    elif values_kind == "dyadic":  # multiples of 1/8, small: every order of the sums is exact
        values = torch.randint(-64, 65, (m,), generator=g).float() / 8
        base = torch.randint(-64, 65, (N,), generator=g).to(out_dtype) / 8
    else:
        values = make_input(m, seed=13) * 10
    if values_kind == "flagged":  # 7 payloads, the third holding an index outside
        m -= m % 7
        indices, values = indices[:m].clone(), values[:m]
        indices[3 * (m // 7) - 1] = -3
        bad = torch.zeros(7, dtype=torch.int32)

    def run():
        out = base.clone()
        flags = None if bad is None else bad.clone()
        gradsieve.sparse_accumulate_(out, indices, values, scales, chunk, flags)
        return (out,) if flags is None else (out, flags)

    def check(out):
        want = reference.sparse_accumulate(base, indices, values)
        assert_same_bits("out", out[0], torch.from_numpy(want).to(out_dtype))
    return run, (check if values_kind == "dyadic" else None)


def case_adaptive(compare_average, error_feedback):
    grad = make_input(N, kind="ties", seed=14)
    average = make_input(N, seed=15).abs()
    momentum = make_input(N, seed=16) * 0.1
    momentum[::3] = 0.0
    residual = make_input(N, seed=17) * 0.5
    args = (0.75, 0.5, 0.8, compare_average, error_feedback, N // 10)

    def run():
        inputs = clone_all((grad, average, momentum, residual))
        return (*gradsieve.adaptive_select(*inputs, *args), *inputs)

    def check(out):
        want = reference_select(grad, average, momentum, residual, *args)
        ma, res, values, indices, count, thr = want
        got = out[:6]
        for name, a, b in [("average", got[0], ma), ("residual", got[1], res),
                           ("values", got[2], values), ("threshold", got[5], np.float32(thr))]:
            assert_same_bits(name, a, torch.from_numpy(np.asarray(b, np.float32)))
        assert np.array_equal(got[3].numpy(), indices) and int(got[4]) == count
        for a, b in zip(out[6:], (grad, average, momentum, residual)):
            assert_same_bits("input", a, b)
    return run, check


def csr16_reference(counts, offsets, valid, numel):
    c, o, v = counts.numpy().astype(np.int64), offsets.numpy().astype(np.int64) & 0xFFFF, valid.numpy()
    world, slots = o.shape
    out = np.full((world, slots), -1, np.int64)
    for w in range(world):
        ends = np.cumsum(np.maximum(c[w], 0))
        j = np.arange(min(max(int(v[w]), 0), slots))
        b = np.searchsorted(ends, j, side="right")
        pos = b * 65536 + o[w, :j.size]
        keep = (b < c.shape[1]) & (pos < numel)
        out[w, j[keep]] = pos[keep]
    return torch.from_numpy(out)


def case_csr16():
    g = torch.Generator().manual_seed(18)
    world, slots, numel = 6, 120_001, 3 * N
    blocks = (numel + 65535) // 65536
    counts = torch.randint(0, 2 * slots // blocks, (world, blocks), generator=g, dtype=torch.int32)
    counts[2, 5] = -4  # malformed
    offsets = torch.randint(-32768, 32768, (world, slots), generator=g, dtype=torch.int16)
    valid = torch.tensor([slots, slots - 17, 0, 5000, slots + 9, -1], dtype=torch.int32)

    def check(out):
        assert torch.equal(out[0], csr16_reference(counts, offsets, valid, numel))
    return (lambda: (gradsieve.csr16_indices(counts, offsets, valid, numel),)), check


def case_predictive(product, history_dtype):
    H, hidden = 3, 8
    grad = make_input(N, seed=19)
    residual = make_input(N, kind="special", seed=20) * 0.5
    ring = [make_input(N, history_dtype, seed=21 + j) for j in range(H)]
    weights = torch.randn(hidden * (H + 4) + 1, generator=torch.Generator().manual_seed(24))

    def check(out):
        assert_same_bits("accumulator", out[0], residual + grad)
    return (lambda: gradsieve.predictive_score(grad, residual, ring, 1, weights, hidden, product)), check


def case_influence(hessian):
    grad = make_input(N, torch.bfloat16, kind="special", seed=25)
    residual, score = make_input(N, seed=26), make_input(N, seed=27).abs()
    h = make_input(N, seed=28) if hessian else None

    def check(out):
        acc, score_out = reference.influence_update_reference(grad, residual, score, h, 1e-3, 0.9)
        assert_same_bits("acc", out[0], torch.from_numpy(acc))
        assert_same_bits("score", out[1], torch.from_numpy(score_out))
    return (lambda: gradsieve.influence_update(grad, residual, score, h, 1e-3, 0.9)), check


def case_segment_mean():
    g = torch.Generator().manual_seed(29)
    small = torch.randint(0, 40, (9000,), generator=g).tolist()  # more than the grain of 4096
    numels = [300_001, 0, 7] + small + [65_536]
    numels.append(N - sum(numels))
    x = make_input(N, seed=30) * 1e3 + 0.1

    def check(out):  # the float64 sums differ in order only: within 1 ulp
        want = torch.from_numpy(reference.segment_mean_reference(x, numels))
        ulps = (out[0].view(torch.int32).long() - want.view(torch.int32).long()).abs()
        assert int(ulps.max()) <= 1
    return (lambda: (gradsieve.segment_mean(x, numels),)), check


def case_decode_average(values, index):
    """4 payloads of 3 * 2^16 + 5 entries' bucket, 20000 entries each (the same positions chosen
    often: the order of the sums matters), the last rank's count out of range (malformed)."""
    from gradsieve.wire import PayloadFormat

    numel, k, world = 3 * (1 << 16) + 5, 20_000, 4
    fmt = PayloadFormat(k, values, 256, index, numel)
    g = torch.Generator().manual_seed(21)
    rows = []
    for rank in range(world):
        indices = torch.randperm(numel // 3, generator=g)[:k].sort().values * 3 + rank % 2
        payload, _ = fmt.pack(torch.tensor(True), indices, make_input(k, seed=30 + rank) * 10, ordered=True)
        rows.append(payload)
    gathered = torch.stack(rows)
    gathered[3, 4:8] = torch.tensor([255, 255, 255, 127], dtype=torch.uint8)  # count 2^31 - 1

    def run():
        out = torch.empty(numel)
        return (out, *fmt.decode_average(gathered, out, world))

    def check(out):
        want = torch.zeros(numel)
        flags = fmt.decode_sum(gathered, want)
        want.div_(world)
        assert_same_bits("out", out[0], want)
        assert torch.equal(out[1], flags[0]) and torch.equal(out[2], flags[1])
        assert out[2].tolist() == [True, True, True, False]
    return run, check


CASES = {
    **{f"decode_average_-{v}-{i}": (case_decode_average, (v, i))
       for v, i in [("fp32", "int32"), ("int8", "csr16"), ("bf16", "csr16")]},
    **{f"topk_abs-{k}-{str(d)[6:]}": (case_topk_abs, (k, d))
       for k, d in [("normal", torch.float32), ("ties", torch.float32), ("special", torch.float32),
                    ("normal", torch.bfloat16)]},
    **{f"quantile_abs-{k}": (case_quantile_abs, (k, torch.float32))
       for k in ["normal", "ties", "special"]},
    "quantile_abs-half": (case_quantile_abs, ("normal", torch.float16)),
    "ef_topk_-float32": (case_ef_topk, (torch.float32,)),
    "ef_topk_-float16": (case_ef_topk, (torch.float16,)),
    "ef_topk_into-float32": (case_ef_topk_into, (torch.float32,)),
    "ef_topk_into-bfloat16": (case_ef_topk_into, (torch.bfloat16,)),
    "regtopk_select_-first": (case_regtopk, (False,)),
    "regtopk_select_-previous": (case_regtopk, (True,)),
    "threshold_select": (case_threshold_select, (False,)),
    "threshold_select-overflow": (case_threshold_select, (True,)),
    "quantize_int8-nearest": (case_quantize, (False, torch.float32, 256)),
    "quantize_int8-nearest-odd-chunk": (case_quantize, (False, torch.float32, 1000)),
    "quantize_int8-nearest-bf16": (case_quantize, (False, torch.bfloat16, 64)),
    "quantize_int8-stochastic": (case_quantize, (True, torch.float32, 256)),
    "quantize_int8-stochastic-half": (case_quantize, (True, torch.float16, 1000)),
    "dequantize_int8-float32": (case_dequantize, (torch.float32,)),
    "dequantize_int8-bfloat16": (case_dequantize, (torch.bfloat16,)),
    "sparse_accumulate_-float32": (case_sparse_accumulate, ("float", torch.float32)),
    "sparse_accumulate_-half": (case_sparse_accumulate, ("float", torch.float16)),
    "sparse_accumulate_-int8": (case_sparse_accumulate, ("int8", torch.float32)),
    "sparse_accumulate_-dyadic": (case_sparse_accumulate, ("dyadic", torch.float32)),
    "sparse_accumulate_-flagged": (case_sparse_accumulate, ("flagged", torch.bfloat16)),
    "adaptive_select": (case_adaptive, (False, True)),
    "adaptive_select-average": (case_adaptive, (True, False)),
    "csr16_indices": (case_csr16, ()),
    "predictive_score": (case_predictive, (False, torch.float32)),
    "predictive_score-product-bf16": (case_predictive, (True, torch.bfloat16)),
    "influence_update": (case_influence, (True,)),
    "influence_update-no-hessian": (case_influence, (False,)),
    "segment_mean": (case_segment_mean, ()),
}


def run_at(run, threads):
    torch.set_num_threads(threads)
    out = run()
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@pytest.mark.parametrize("name", list(CASES))
def test_same_bits_on_any_thread_count(name, restore_threads):
    make, args = CASES[name]
    torch.set_num_threads(1)  # the inputs: make_input's index_put of duplicate picks is racy
    run, check = make(*args)
    one = run_at(run, 1)
    if check is not None:
        check(one)
    for threads in THREADS[1:]:
        many = run_at(run, threads)
        assert len(many) == len(one)
        for j, (a, b) in enumerate(zip(many, one)):
            assert_same_bits(f"{name}: output {j} on {threads} threads", a, b)


# ---------------------------------------------------------------------------------- the OpenMP build
def elf_dynamic(path):
    """(DT_NEEDED names, undefined dynamic symbol names) of an ELF64 little-endian shared object,
    read from its section headers."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not an ELF64 LE file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]

    def string(section, at):
        start = sections[section][4] + at
        return data[start:data.index(b"\0", start)].decode()

    needed, undefined = [], set()
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind == 6:  # SHT_DYNAMIC
            for at in range(offset, offset + size, 16):
                tag, value = struct.unpack_from("<qQ", data, at)
                if tag == 1:  # DT_NEEDED
                    needed.append(string(link, value))
        elif kind == 11:  # SHT_DYNSYM
            for at in range(offset + entsize, offset + size, entsize):
                name, _, _, shndx = struct.unpack_from("<IBBH", data, at)
                if shndx == 0 and name:
                    undefined.add(string(link, name))
    return needed, undefined


OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")


def mapped_openmp_runtimes():
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/" in line}
    return {os.path.realpath(p) for p in paths if os.path.basename(p).startswith(OPENMP_RUNTIMES)}


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads ELF and /proc")


@linux_only
def test_extension_links_the_openmp_runtime_of_torch():
    """gradsieve._C was compiled with -fopenmp: it needs the OpenMP runtime and calls it (an
    extension built without OpenMP runs every at::parallel_for on one thread), and the process has
    one OpenMP runtime, torch's (a second one would give two thread pools and two
    set_num_threads)."""
    assert "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    needed, undefined = elf_dynamic(gradsieve._C.__file__)
    assert any(name.startswith(OPENMP_RUNTIMES) for name in needed), needed
    assert {"omp_get_num_threads", "omp_get_thread_num"} <= undefined
    # In a fresh interpreter: other libraries the test session loaded (scikit-learn) bring their
    # own libgomp, which says nothing about gradsieve's.
    script = ("import sys; sys.path.insert(0, %r); import torch, gradsieve, test_cpu_threads as t; "
              "print(len(t.mapped_openmp_runtimes()), sorted(t.mapped_openmp_runtimes()))"
              % os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] == "1", result.stdout


def thread_cpu_ticks():
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks[tid] = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks


@linux_only
def test_an_op_runs_on_two_os_threads(restore_threads):
    """With 2 threads, ef_topk_ on 2^22 entries keeps a second OS thread busy (without OpenMP only
    the calling thread does any work)."""
    torch.set_num_threads(2)
    grad, residual = make_input(1 << 22, seed=31), torch.zeros(1 << 22)
    gradsieve.ef_topk_(residual, grad, 1000)  # starts the pool
    before = thread_cpu_ticks()
    me = str(threading.get_native_id())
    deadline = time.monotonic() + 5
    while True:
        for _ in range(5):
            gradsieve.ef_topk_(residual, grad, 1000)
        after = thread_cpu_ticks()
        busy = [t for t, v in after.items() if t != me and v - before.get(t, 0) >= 5]
        if busy or time.monotonic() > deadline:
            break
    assert busy, "no thread other than the caller did any work"
