"""Host-side launch helpers: the compiled-kernel cache key must separate exactly the argument
facts Triton specialises on, and the plain-Python grid helpers must agree with Triton's."""
import pytest
import torch
import triton

from fusedpeft._kernels import triton_kernels

buffers, configs, fast_launch = triton_kernels.buffers, triton_kernels.configs, triton_kernels.fast_launch
gemm, layout = triton_kernels.gemm, triton_kernels.layout


def _key(*args):
    return fast_launch.specialization_key(args)


def test_specialization_key_separates_what_triton_specialises_on():
    base = torch.empty(64, dtype=torch.bfloat16)
    aligned_other = torch.empty(64, dtype=torch.bfloat16)
    misaligned = base[1:]
    assert _key(base, 32, 0.5) == _key(aligned_other, 48, 0.25)  # same facts, other values
    assert _key(base) != _key(misaligned)  # 16-byte alignment
    assert _key(base) != _key(base.float())  # dtype
    assert _key(1) != _key(2)  # the value 1
    assert _key(16) != _key(17)  # divisibility by 16
    assert _key(17) == _key(33)
    assert _key(5) != _key(2**31 + 5)  # int32 or int64
    assert _key(-(2**31) - 16) != _key(-16)
    assert _key(True) != _key(False)
    assert _key(1) != _key(1.0)
    param = torch.nn.Parameter(torch.empty(8))
    assert _key(param) == _key(torch.empty(8))  # subclasses key like their tensor


class _FakeCompiled:
    """What _Compiled reads of a CompiledKernel: a launcher (run), its function and metadata, and
    Triton's own entry (kernel[grid])."""

    def __init__(self):
        self.direct, self.entry = [], []
        self.function, self.packed_metadata = "function", "metadata"

    def _init_handles(self):
        pass

    def run(self, *args):
        self.direct.append(args)

    def __getitem__(self, grid):
        return lambda *args: self.entry.append((grid, args))


def test_compiled_launches_directly_unless_a_launch_hook_is_installed(monkeypatch):
    """Triton (3.5 on) keeps each launch hook as a HookChain, present and empty by default: the
    direct launcher runs then; once a hook is added (a profiler), Triton's own entry does, and
    again after it is removed."""
    monkeypatch.setattr(fast_launch, "current_stream", lambda device: 7)
    kernel = _FakeCompiled()
    entry = fast_launch._Compiled(kernel)
    hooks = getattr(triton, "knobs", None)
    assert not fast_launch.launch_hooks_installed()
    entry((2, 1, 1), 0, ("x", 3))
    assert kernel.direct == [(2, 1, 1, 7, "function", "metadata", None, None, None, "x", 3)] and not kernel.entry
    if hooks is None or not hasattr(hooks.runtime.launch_enter_hook, "add"):
        return  # a Triton without HookChain: nothing more to check here

    def hook(*args):
        return None

    hooks.runtime.launch_enter_hook.add(hook)
    try:
        assert fast_launch.launch_hooks_installed()
        entry((2, 1, 1), 0, ("x", 3))
        assert kernel.entry == [((2, 1, 1), ("x", 3))] and len(kernel.direct) == 1
    finally:
        hooks.runtime.launch_enter_hook.remove(hook)
    assert not fast_launch.launch_hooks_installed()
    entry((2, 1, 1), 0, ("x", 3))
    assert len(kernel.direct) == 2


def test_compiled_falls_back_to_tritons_entry_where_the_launcher_differs(monkeypatch):
    monkeypatch.setattr(fast_launch, "current_stream", lambda device: 7)
    kernel = _FakeCompiled()

    def other_launcher(grid_x, grid_y):  # takes fewer arguments than 3.6's launcher
        raise AssertionError("not reached")

    kernel.run = other_launcher
    entry = fast_launch._Compiled(kernel)
    entry((1, 1, 1), 0, ("x",))
    entry((1, 1, 1), 0, ("y",))
    assert entry.run is None and kernel.entry == [((1, 1, 1), ("x",)), ((1, 1, 1), ("y",))]


@pytest.mark.parametrize("a", [0, 1, 2, 15, 16, 17, 1000, 4097])
@pytest.mark.parametrize("b", [1, 3, 16, 64])
def test_grid_helpers_match_triton(a, b):
    assert layout.cdiv(a, b) == (a + b - 1) // b
    assert layout.next_power_of_2(a) == triton.next_power_of_2(a)


@pytest.mark.parametrize("M,C", [(1, 1), (37, 24), (4096, 16), (10, 5000)])
def test_split_rows_covers_every_row_once(M, C):
    col_blocks, splits, rows_per_split = layout.split_rows(M, C, 16, 16, torch.device("cpu"))
    assert col_blocks * 16 >= C and (col_blocks - 1) * 16 < C
    assert rows_per_split % 16 == 0 and splits * rows_per_split >= M and (splits - 1) * rows_per_split < M


class _Recorder:
    """Stands in for every compiled kernel: records (grid, args) instead of launching."""

    def __init__(self):
        self.calls = []

    def __call__(self, grid3, device, args):
        self.calls.append((grid3, args))


class _AlwaysHit(dict):
    def __init__(self, entry):
        super().__init__()
        self.entry = entry

    def get(self, key, default=None):
        return self.entry


@pytest.fixture
def stubbed_gpu(monkeypatch, use_settings):
    """The launch path as on a GPU, without one: no interpreter, 4 "SMs", no descriptor allocator,
    fresh plan and tuning caches. Tests stub the kernel launch itself."""
    monkeypatch.setattr(layout, "interpreting", lambda: False)
    monkeypatch.setattr(layout, "num_sms", lambda index: 4)
    monkeypatch.setattr(buffers, "ensure_allocator", lambda: None)
    monkeypatch.setattr(configs, "TUNED", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    use_settings(fast_launch=True)
    fast_launch.clear_plans()
    yield monkeypatch
    fast_launch.clear_plans()


def _same_launch(first, second, inputs):
    (grid1, args1), (grid2, args2) = first, second
    assert grid1 == grid2 and len(args1) == len(args2)
    for i, (a1, a2) in enumerate(zip(args1, args2)):
        if isinstance(a1, torch.Tensor):
            assert isinstance(a2, torch.Tensor) and a1.dtype == a2.dtype, i
            if a1.data_ptr() in inputs:  # the caller's tensors: the very same memory
                assert a2.data_ptr() == a1.data_ptr(), i
        else:
            assert type(a1) is type(a2) and a1 == a2, (i, a1, a2)


def test_launch_plans_replay_the_planning_call(stubbed_gpu, use_settings):
    """A repeated launch is served from its plan (gemm's plans, and lora's for the weight
    gradients) without re-deriving anything;
    the plan must hand the kernel the same grid and arguments, in the same order, as the call
    that made it. Checked with the GPU stubbed out, for every launch the LoRA, IA3 and SSF
    forward and backward make."""
    import fusedpeft
    from fusedpeft.ops import ia3_linear, lora_linear, ssf_linear
    from fusedpeft.ops import lora as lora_mod

    monkeypatch = stubbed_gpu
    recorder = _Recorder()
    monkeypatch.setattr(fast_launch, "COMPILED", _AlwaysHit(recorder))
    use_settings(tile_config=0)
    monkeypatch.setattr(lora_mod, "_new_seed", lambda device: torch.tensor([12345], device=device))
    M, K, N, r = 100, 48, 40, 8
    x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(N, K, dtype=torch.bfloat16)
    b = torch.randn(N, dtype=torch.bfloat16, requires_grad=True)
    A = torch.randn(r, K, dtype=torch.bfloat16, requires_grad=True)
    B = torch.randn(N, r, dtype=torch.bfloat16, requires_grad=True)
    l_in, l_out, shift = (torch.randn(n, dtype=torch.bfloat16, requires_grad=True) for n in (K, N, N))
    g = torch.randn(M, N, dtype=torch.bfloat16)
    calls = {
        "lora": lambda: lora_linear(x, W, b, A, B, 0.5, dropout_p=0.2, training=True),
        "lora decode": lambda: lora_linear(x[:3], W, b, A, B, 0.5),
        "ia3 out": lambda: ia3_linear(x, W, b, l_out, False),
        "ia3 in": lambda: ia3_linear(x, W, b, l_in, True),
        "ssf": lambda: ssf_linear(x, W, b, l_out, shift),
    }
    for name, call in calls.items():
        for mode in ("save", "recompute"):
            use_settings(output_scale_grad=mode)
            inputs = {t.data_ptr() for t in (x, W, b, A, B, l_in, l_out, shift, g)}
            launches = []
            for _ in range(2):  # the first call plans, the second replays
                recorder.calls.clear()
                with fusedpeft.use_backend("triton"):
                    y = call()
                    y.backward(g[: y.shape[0]])
                launches.append(list(recorder.calls))
            assert launches[0], name
            assert len(launches[0]) == len(launches[1]), name
            for first, second in zip(*launches):
                _same_launch(first, second, inputs)
    lora, lowrank, rescale = triton_kernels.lora, triton_kernels.lowrank, triton_kernels.rescale
    for planned in (lora._FORWARD.plans, lora._GRAD_X.plans, lowrank._PRODUCT.plans, lowrank._WEIGHT_GRAD_PLANS,
                    rescale._RESCALE.plans, rescale._REDUCE.plans):
        assert planned  # the second calls did go through plans


# (M, C, R, split over M in the interpreter's grid)
@pytest.mark.parametrize("M,C,R,split", [(150, 8, 4, True), (333, 12, 16, True), (40, 30, 8, False)])
def test_weight_grad_split_reduction_is_exact_repeatable_and_resets_its_tickets(M, C, R, split):
    """lowrank_weight_grad_kernel splits M over programs; the last program of each column block
    sums the partials in split order and resets its ticket counter. Repeated calls on the one
    counter buffer must give the same (bit-identical) result, with or without the rank-r update
    it can write beside (every element of it, and nothing without it), and leave every counter at
    zero."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    l = torch.randn(M, C, device=dev, dtype=torch.bfloat16)
    s = torch.randn(M, R, device=dev)
    q = torch.randn(R, C, device=dev, dtype=torch.bfloat16).T  # A^T as a view, as LoRA's backward passes it
    ref = 0.5 * l.double().T @ s.bfloat16().double()
    update_ref = 0.5 * s.bfloat16().double() @ q.double().T
    results = []
    for transpose, with_update in ((False, False), (True, True), (False, True)):
        out = torch.empty((R, C) if transpose else (C, R), device=dev, dtype=torch.bfloat16)
        colsum = torch.empty(C, device=dev, dtype=torch.bfloat16)
        update_out = torch.full((M, C), float("nan"), device=dev, dtype=torch.bfloat16)  # never read
        triton_kernels.lowrank.weight_grad(l, s, out, scale=0.5, transpose_out=transpose, colsum=colsum,
                                           update=(update_out, q) if with_update else None)
        got = out.T if transpose else out
        assert (got.double() - ref).norm() / ref.norm() < 1e-2
        assert (colsum.double() - l.double().sum(0)).norm() / l.double().sum(0).norm() < 1e-2
        if with_update:
            assert (update_out.double() - update_ref).norm() / update_ref.norm() < 1e-2
        else:
            assert update_out.isnan().all()
        results.append(got.clone())
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    if dev == "cpu":
        assert (layout.split_rows(M, C, 16, 16, l.device)[1] > 1) == split
    for counters in buffers._COUNTERS.values():
        assert int(counters.abs().sum()) == 0


def test_unfit_rank_r_epilogue_falls_back_to_a_separate_update(stubbed_gpu, use_settings):
    """When no tile config can hold the rank-r epilogue (the H100 at r = 256 and large M), the
    launch runs the GEMM alone (cuBLAS) and the rank-r update apart; the failure is remembered per
    key (no re-tuning on every call), and a launch without that way out (the rank-r product in the
    K loop) raises NoConfigFits."""
    monkeypatch = stubbed_gpu
    use_settings(autotune=False)
    lora, lowrank = triton_kernels.lora, triton_kernels.lowrank
    tried = []

    def launch_or_run_out(kernel, grid, args, constexprs, num_warps, num_stages):
        if kernel is lowrank.lowrank_update_kernel:  # stand-in: out += scale * l @ q^T
            named = dict(zip(kernel.arg_names, args))  # (its scale by name: a position drifts with the signature)
            named["out_ptr"].add_(named["scale"] * named["l_ptr"] @ named["q_ptr"].T)
            return None
        tried.append(kernel)
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(fast_launch, "cached_launch", launch_or_run_out)
    M, K, N, r = 70, 24, 40, 8
    a, w, bias = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    A, B, lr = torch.randn(r, K), torch.randn(N, r), torch.randn(M, r)
    expected = a @ w.T + bias + lr @ B.T  # a precomputed lr carries its scale: lr_scale is not applied
    for _ in range(2):
        out = torch.empty(M, N)
        lora._launch_lora(lora._FORWARD, a, w, out, A, B, lr, 0.5, None, 0.0, bias=bias, in_loop=False,
                          dropout_arg=False)
        assert torch.allclose(out, expected, atol=1e-4)
    assert len(tried) == len(configs.candidates(M, N, 4))  # tuned once; the second call knew the key does not fit
    with pytest.raises(configs.NoConfigFits, match="no Triton config"):
        lora._launch_lora(lora._FORWARD, a, w, torch.empty(M, N), A, B, lr, 0.5, None, 0.0, bias=bias, in_loop=True,
                          dropout_arg=False)


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_lowrank_product_scales_and_masks(dropout):
    """lowrank_product: out = scale * (a * mask) @ w^T, w given as A ([r, K]) or as the view B^T of
    a stored B ([K, r]: the grad_y B of the backward), against float64 with the kernels' mask."""
    lowrank, lora = triton_kernels.lowrank, triton_kernels.lora
    M, K, r = 37, 40, 5
    a = torch.randn(M, K)
    seed = torch.tensor([77], dtype=torch.int64)
    mask = lora.dropout_mask(seed, (M, K), dropout, a.device) if dropout else torch.ones(M, K)
    for w_mat in (torch.randn(r, K), torch.randn(K, r).T):
        out = torch.empty(M, r)
        lowrank.lowrank_product(a, w_mat, out, -0.75, seed, dropout)
        ref = -0.75 * (a.double() * mask.double()) @ w_mat.double().T
        assert (out.double() - ref).norm() / ref.norm() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,C", [(37, 40), (1, 13), (0, 8), (20, 131)])
@pytest.mark.parametrize("strided", [False, True])
def test_dropped_is_x_times_the_kernels_mask(dtype, M, C, strided):
    """dropped(x): x * mask / (1 - p) in one pass, with the mask every LoRA kernel draws for (seed, x's
    shape, p), in x's dtype (ragged rows and columns, and a row-strided x)."""
    lora = triton_kernels.lora
    p, seed = 0.3, torch.tensor([91], dtype=torch.int64)
    x = torch.randn(M, C + 5 if strided else C).to(dtype)[:, :C]
    out = lora.dropped(x, seed, p)
    mask = lora.dropout_mask(seed, (M, C), p, x.device)
    assert out.dtype == dtype and out.shape == (M, C)
    assert torch.equal(out != 0, (mask != 0) & (x != 0)), "not the kernels' mask"
    # values: x / (1 - p) rounded once (Triton's interpreter truncates to bf16, a GPU rounds: one step apart)
    torch.testing.assert_close(out.float(), x.float() * mask / (1.0 - p), atol=0,
                               rtol=2**-7 if dtype == torch.bfloat16 else 1e-6)
    if M * C > 100:
        assert 0.5 < mask.mean() < 0.9  # the mask drops some and keeps most


def _philox4x32(counter, seed, rounds):
    """Philox4x32 (Salmon et al., SC'11) in numpy: the four 32-bit words drawn for each uint32
    counter (its other three words zero) under the 64-bit key ``seed``."""
    import numpy as np

    mask32 = np.uint64(0xFFFFFFFF)
    c0, c1 = counter.astype(np.uint64), np.zeros_like(counter, dtype=np.uint64)
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(rounds):
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2  # < 2^64: exact in uint64
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask32)
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask32, (k1 + np.uint64(0xBB67AE85)) & mask32
    return c0, c1, c2, c3


def test_dropout_mask_is_philox4x32_with_the_stated_rounds():
    """The kernels' keep-mask bit for bit against an independent Philox4x32 at
    dropout.PHILOX_ROUNDS rounds: one draw per 8 columns of a row, counter row * ceil(C / 8) +
    col // 8, its words split into eight 16-bit uniforms, kept where uniform >= 65536 p. A mask
    from fewer rounds, another counter or another order of the uniforms fails."""
    import numpy as np

    lora, dropout = triton_kernels.lora, triton_kernels.dropout
    M, C, p, seed = 5, 29, 0.3, 2**33 + 12345  # a seed past 32 bits: both key words in play
    mask = lora.dropout_mask(torch.tensor([seed], dtype=torch.int64), (M, C), p, torch.device("cpu"))
    groups = (C + 7) // 8
    counter = np.arange(M * groups, dtype=np.uint64).reshape(M, groups)
    words = _philox4x32(counter, seed, int(dropout.PHILOX_ROUNDS))
    lo, hi = [w & np.uint64(0xFFFF) for w in words], [w >> np.uint64(16) for w in words]
    # per group of eight columns: the low halves of words 0, 2, 1, 3, then the high halves
    uniform16 = np.stack([lo[0], lo[2], lo[1], lo[3], hi[0], hi[2], hi[1], hi[3]], axis=-1).reshape(M, groups * 8)
    expected = (uniform16[:, :C].astype(np.float64) >= p * 65536.0).astype(np.float32)
    assert np.array_equal(mask.numpy(), expected)
    assert not np.array_equal((np.stack(_philox4x32(counter, seed, 10), -1) & np.uint64(1)),
                              (np.stack(words, -1) & np.uint64(1))), "the round count would not show"


@pytest.mark.parametrize("M,N", [(960, 195), (960, 13), (8192, 4096), (30, 13), (300, 1024), (16, 4096)])
@pytest.mark.parametrize("element_size", [2, 4])
def test_128_row_tiles_take_two_warpgroups(M, N, element_size):
    """No candidate runs a 128-row tile with one warpgroup (4 warps): under Triton 3.6 on the H100
    those gave wrong results and illegal accesses at some shapes (configs._gemm_configs)."""
    cands = configs.candidates(M, N, element_size)
    assert cands and not [c for c in cands if c.kwargs["BLOCK_M"] >= 128 and c.num_warps < 8]


@pytest.mark.parametrize("M,N", [(2, 7404), (32, 20), (16, 4096), (64, 399)])
@pytest.mark.parametrize("element_size", [2, 4])
def test_small_m_candidates_leave_out_the_64_by_32_tile(M, N, element_size):
    """The 64 x 32 x 128 tile at 4 warps and 4 stages (64 x 3 at float32) is no candidate, small-M or
    skinny (N = 20 gave it too): its grad_x with the in-loop rank-r product was wrong and faulted on
    the H100 (configs._gemm_configs)."""
    cands = configs.candidates(M, N, element_size)
    block_k = 128 if element_size == 2 else 64
    assert cands and not [c for c in cands if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) ==
                          (64, 32, block_k) and (c.num_warps, c.num_stages) == (4, 4 if element_size == 2 else 3)]


def test_forced_tile_config_must_exist(use_settings):
    """settings.tile_config names a candidate by index; one past the list is refused by name."""
    n = len(configs.candidates(300, 1024, 2))
    use_settings(tile_config=n - 1)
    forced = configs.tuned_config(("k",), 300, 1024, 2, lambda cfg: None)
    assert str(forced) == str(configs.candidates(300, 1024, 2)[-1])
    use_settings(tile_config=n)
    with pytest.raises(ValueError, match="tile_config"):
        configs.tuned_config(("k",), 300, 1024, 2, lambda cfg: None)


def test_untuned_and_forced_loop_picks_stay_with_their_settings(use_settings, monkeypatch):
    """With autotune off the first config that runs is taken; that pick (and a 'nothing fits' under a
    forced loop form) is kept for those settings alone: with autotune back on the key is timed."""
    monkeypatch.setattr(configs, "TUNED", {})
    monkeypatch.setattr(configs, "CONFIG_STORE", None)
    cands = configs.candidates(300, 1024, 2)
    timed = {str(c): 1.0 + i for i, c in enumerate(cands)}
    timed[str(cands[-1])] = 0.5  # the fastest is the last: autotune must find it
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), timed[str(ran[-1])])[1])
    ran = []
    use_settings(autotune=False)
    assert str(configs.tuned_config(("k",), 300, 1024, 2, ran.append)) == str(cands[0])
    use_settings(autotune=True)
    assert str(configs.tuned_config(("k",), 300, 1024, 2, ran.append)) == str(cands[-1])

    def refuse(cfg):
        raise triton.runtime.errors.OutOfResources(1, 0, "shared memory")

    use_settings(autotune=True, loop_form="per_tile")
    with pytest.raises(configs.NoConfigFits):
        configs.tuned_config(("k2",), 300, 1024, 2, refuse)
    use_settings(autotune=True, loop_form="auto")
    assert str(configs.tuned_config(("k2",), 300, 1024, 2, ran.append)) == str(cands[-1])

    def fault_on_the_second(cfg):  # a CUDA error is sticky: named at once, never skipped as a misfit
        if str(cfg) == str(cands[1]):
            raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")
        ran.append(cfg)

    with pytest.raises(RuntimeError, match="faulted on the GPU") as raised:
        configs.tuned_config(("k3",), 300, 1024, 2, fault_on_the_second)
    assert str(cands[1]) in str(raised.value)

    class Store:  # a stored winner that faults when it is tried again is named too, not re-tuned over
        def lookup(self, kind, key):
            return configs._config_to_json(cands[1])

        def record(self, kind, key, value):
            raise AssertionError("nothing is tuned after a fault")

    monkeypatch.setattr(configs, "CONFIG_STORE", Store())
    with pytest.raises(RuntimeError, match="faulted on the GPU") as raised:
        configs.tuned_config(("k4",), 300, 1024, 2, fault_on_the_second)
    assert str(cands[1]) in str(raised.value)


@pytest.mark.parametrize("dtype,expect", [(torch.bfloat16, True), (torch.float16, True), (torch.float32, False)],
                         ids=str)
def test_descriptors_only_for_16_bit_operands(dtype, expect, use_settings):
    """TMA descriptors where the layout allows them, but never for float32 operands (whose grad_x
    kernel faulted through them on an H100): a float32 tensor beside 16-bit ones turns them off."""
    layout = triton_kernels.layout
    aligned = torch.empty(64, 64, dtype=dtype)
    assert layout.descriptor_ok(aligned) == expect
    assert layout.descriptor_ok(torch.empty(64, 64, dtype=torch.bfloat16), aligned) == expect
    assert not layout.descriptor_ok(aligned[:, 1:])  # a unit last stride but an unaligned base and row length
    use_settings(tensor_descriptors=False)
    assert not layout.descriptor_ok(aligned)


def test_every_direct_launch_passes_its_arguments_in_signature_order(monkeypatch):
    """The compiled kernel's launcher takes a kernel's arguments positionally: the runtime ones as
    given, then the constexprs in signature order (fast_launch). So every kernel launched through
    cached_launch must declare its constexprs after all its runtime parameters, get exactly as many
    runtime arguments as it declares and every constexpr by name. Checked on the launches of the
    serving ops, DoRA (the norm, the dropout path) and LoRA with dropout, forward and backward."""
    import inspect

    import triton.language as tl

    import fusedpeft
    from fusedpeft.ops import dora_linear, lora_linear, multi_ia3_linear, multi_lora_linear

    seen = {}
    real = fast_launch.cached_launch

    def spy(kernel, grid, args, constexprs, num_warps, num_stages):
        seen.setdefault(kernel, []).append((len(args), set(constexprs)))
        return real(kernel, grid, args, constexprs, num_warps, num_stages)

    monkeypatch.setattr(fast_launch, "cached_launch", spy)
    S, R, K, N = 3, 8, 24, 40
    x3 = torch.randn(2, 5, K)
    W, b = torch.randn(N, K) / K**0.5, torch.randn(N)
    A, B = torch.randn(S, R, K), torch.randn(S, N, R)
    scalings, ranks, seq = torch.rand(S) + 0.5, torch.tensor([8, 4, 2], dtype=torch.int32), torch.tensor([2, -1])
    with torch.no_grad():
        for backend in ("triton", "bgmv", "bgmv_one", "sgmv_cublas"):
            with fusedpeft.use_backend(backend):
                multi_lora_linear(x3, W, b, A, B, scalings, ranks, seq)
        with fusedpeft.use_backend("triton"):
            multi_ia3_linear(x3, W, b, torch.rand(S, N) + 0.5, seq, False)
    x = torch.randn(7, K, requires_grad=True)
    a, bb = (torch.randn(4, K) / K**0.5).requires_grad_(), torch.randn(N, 4).requires_grad_()
    m = (torch.rand(N) + 0.5).requires_grad_()
    with fusedpeft.use_backend("triton"):
        dora_linear(x, W, b, a, bb, 0.5, m, dropout_p=0.3, training=True).sum().backward()
        lora_linear(x, W, b, a, bb, 0.5, dropout_p=0.3, training=True).sum().backward()
    names = {k.fn.__name__ for k in seen}
    assert {"bgmv_shrink_kernel", "bgmv_one_kernel", "sgmv_kernel", "grouped_shrink_kernel", "grouped_expand_kernel",
            "multi_ia3_kernel", "dora_norm_kernel", "dropped_kernel"} <= names, names
    for kernel, calls in seen.items():
        params = inspect.signature(kernel.fn).parameters
        constexpr = [p.annotation in ("tl.constexpr", tl.constexpr) for p in params.values()]
        first = constexpr.index(True) if True in constexpr else len(constexpr)
        assert all(constexpr[first:]), f"{kernel.fn.__name__}: a runtime parameter after a constexpr"
        declared = {n for n, c in zip(params, constexpr) if c}
        for n_args, given in calls:
            assert n_args == first and given == declared, (kernel.fn.__name__, n_args, first, given ^ declared)
