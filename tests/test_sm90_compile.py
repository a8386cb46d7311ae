"""Every Triton kernel, at every configuration its launchers pick at ViT-B / Med-ST shapes, compiled ahead of
time for Hopper (sm_90a) with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``. What is
asserted holds on any supported Triton, not one version's register allocation: every variant compiles; Triton's
bundled ptxas (-v --gpu-name sm_90a) reports shared memory within 227 KB, no spills in the GEMM kernels and at
most SPILL_BYTES_ELSEWHERE bytes of spill traffic in any other kernel; every bf16 and TF32 GEMM uses wgmma (never
mma.sync). No GPU needed. The launchers run on meta tensors with ``launch``
recorded (tests/_sm90.py), so the compiled specialisations are the ones a real launch would compile.

``MEDST_WRITE_SM90_TABLE=1`` also writes the table to benchmarks/results/sm90_compile.md.
"""
import multiprocessing
import os
import itertools
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - CPU wheels without Triton
    HAS_TRITON = False

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton does not import here")

TABLE = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "sm90_compile.md")

# ViT-B: 40-160 studies per step, half with a lateral; width 768, hidden 3072. Residual stream x / GEMM dtype:
# autocast (fp32 stream, bf16 GEMMs), a bf16 stream, and exact fp32.
FFN_STUDIES = (40, 100, 160)
FFN_DTYPES = ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32))
# Local alignment: 111 word slots x 392 patches, d = 128, both directions, masks on and off, fp32 and bf16.
ALIGN_BATCH = (40, 64, 160)
ALIGN_SIDES = ((111, 392, True), (392, 111, False))
ALIGN_DTYPES = (torch.float32, torch.bfloat16)

# At most this many spill bytes (stores + loads) in one non-GEMM kernel: a few bytes of register pressure in a
# softmax / reduction kernel move with Triton's register allocator from version to version and cost nothing
# measurable; spills in a GEMM's main loop would, so those must be zero.
SPILL_BYTES_ELSEWHERE = 256

# kernels whose products must run on the tensor cores (wgmma) when their compute dtype is bf16
GEMM_KERNELS = {"_grouped_mm_kernel", "_grouped_wgrad_kernel", "_attn_fwd_kernel", "_attn_bwd_kernel",
                "_s_fwd_kernel", "_s_bwd_kernel"}


def switch_launches(batch: int, tq: int, tc: int, masks: bool, renorm: bool, ct, d: int = 128):
    """The local loss's research switches (LossCfg.local_weighting "uniform", local_scope "batch", and both):
    forward + backward launches, recorded as _sm90.local_align_launches records the default ones."""
    import _sm90
    from medst_fast.kernels import local_align as la

    m = _sm90._meta
    q, c = m(batch, tq, d), m(batch, tc, d)
    qm = m(batch, tq, dtype=torch.bool) if masks else None
    cm = m(batch, tc, dtype=torch.bool) if masks else None
    w, b = m(3 * d, d), m(3 * d)
    with _sm90.record_launches(la) as rec:
        for uniform, scope_batch in ((True, False), (False, True), (True, True)):
            _, ctx, a, rows, vecs, dcst = la._loss_fwd_triton(q, c, qm, cm, w, b, 0.1, renorm, ct, uniform=uniform,
                                                              batch=scope_batch)
            la._loss_bwd_triton(m(()), q, c, qm, cm, w, ctx, a, rows, vecs, dcst, 0.1, renorm, ct, batch=scope_batch)
    return rec


def ffn_config_launches(studies: int, x_dt, ct):
    """The MoVE FFN launches with each config of its candidate sets forced in turn (what MEDST_FAST_AUTOTUNE=1
    can pick on a GPU), one config of the grouped GEMM and one of the weight-gradient GEMM at a time."""
    import _sm90
    from medst_fast.kernels import move_ffn as mf

    kind = mf._cfg_kind(ct)
    gemm, wgrad = mf.GEMM_CONFIGS[kind], mf.WGRAD_CONFIGS[kind]
    launches = []
    for i in range(max(len(gemm), len(wgrad))):
        with mf.forced_configs(gemm=gemm[i % len(gemm)], wgrad=wgrad[i % len(wgrad)]):
            launches += _sm90.move_ffn_launches(studies, x_dt, ct)
    return launches


def all_launches():
    import _sm90

    launches = []
    for studies, (x_dt, ct) in itertools.product(FFN_STUDIES, FFN_DTYPES):
        launches += [(ct, l) for l in _sm90.move_ffn_launches(studies, x_dt, ct)]  # the table's picks
        launches += [(ct, l) for l in ffn_config_launches(studies, x_dt, ct)]  # every config of the sets
    for batch, (tq, tc, renorm), masks, ct in itertools.product(ALIGN_BATCH, ALIGN_SIDES, (False, True), ALIGN_DTYPES):
        launches += [(ct, l) for l in _sm90.local_align_launches(batch, tq, tc, masks, renorm, ct)]
        launches += [(ct, l) for l in switch_launches(batch, tq, tc, masks, renorm, ct)]
    return launches + tf32_launches()


def tf32_launches():
    """The fp32 launches under torch.set_float32_matmul_precision("high") (--amp none on a GPU): fp32 operands as
    TF32 on the tensor cores, with their own tiles (move_ffn's "tf32" config sets, local_align's tf32 tiles)."""
    import _sm90

    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        launches = []
        for studies in FFN_STUDIES:
            launches += [("tf32", l) for l in _sm90.move_ffn_launches(studies, torch.float32, torch.float32)]
            launches += [("tf32", l) for l in ffn_config_launches(studies, torch.float32, torch.float32)]
        for batch, (tq, tc, renorm), masks in itertools.product(ALIGN_BATCH, ALIGN_SIDES, (False, True)):
            launches += [("tf32", l) for l in _sm90.local_align_launches(batch, tq, tc, masks, renorm, torch.float32)]
    finally:
        torch.set_float32_matmul_precision(prev)
    return launches


def unique_variants(launches):
    """{compile key: (compute dtype, launch)} in a fixed order (sorted by kernel, then first appearance)."""
    import _sm90

    seen = {}
    for ct, launch in launches:
        seen.setdefault(_sm90.compile_key(launch), (ct, launch))
    return dict(sorted(seen.items(), key=lambda kv: (kv[0][0], kv[0][1])))


@pytest.fixture(scope="module")
def compiled():
    from medst_fast.kernels import _utils
    import _sm90

    if _utils.interpreting():
        pytest.skip("TRITON_INTERPRET=1 is set: the ahead-of-time compile needs Triton's compiled JIT")
    variants = unique_variants(all_launches())
    specs = [_sm90.job_spec(launch) for _, launch in variants.values()]
    env_interp = os.environ.pop("TRITON_INTERPRET", None)
    try:
        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch threads
        with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
            stats = list(pool.map(_sm90.compile_job, specs))
    finally:
        if env_interp is not None:
            os.environ["TRITON_INTERPRET"] = env_interp
    rows = []
    for (key, (ct, launch)), spec, st in zip(variants.items(), specs, stats):
        tile = tuple(launch.meta.get(k) for k in ("BLOCK_R", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"))
        rows.append(dict(module=launch.module.rsplit(".", 1)[-1], kernel=launch.kernel, ct=ct,
                         config=_sm90.config_label(launch), tile=tile, signature=tuple(spec[2].items()), **st))
    if os.environ.get("MEDST_WRITE_SM90_TABLE") == "1":
        write_table(rows, len(all_launches()))
    return rows


def write_table(rows, n_launches):
    import triton

    import _sm90

    lines = [
        "# Triton kernels compiled ahead of time for sm_90a (H100 / H200)",
        "",
        f"Generated by `MEDST_WRITE_SM90_TABLE=1 python -m pytest tests/test_sm90_compile.py` (no GPU): triton "
        f"{triton.__version__}, torch {torch.__version__}, ptxas `{os.path.basename(_sm90.ptxas_path())}` "
        f"bundled with Triton, `-v --gpu-name sm_90a`. {n_launches} launches recorded from the launchers at ViT-B "
        f"shapes (MoVE FFN: {', '.join(map(str, FFN_STUDIES))} studies, half with a lateral, width 768, hidden "
        f"3072, x/compute dtypes fp32/bf16, bf16/bf16, fp32/fp32; local alignment: B {', '.join(map(str, ALIGN_BATCH))},"
        f" 111 words x 392 patches both ways, d 128, masks on/off, fp32 and bf16, each with the default loss, "
        f"uniform weighting, batch scope and both switches; fp32 also as TF32 (compute `tf32`: "
        f"torch.set_float32_matmul_precision('high')); the MoVE FFN also with each config of "
        f"its GEMM candidate sets forced, `move_ffn.GEMM_CONFIGS` / `WGRAD_CONFIGS`, what MEDST_FAST_AUTOTUNE=1 "
        f"can pick) compile to "
        f"{len(rows)} distinct binaries, listed here. Shared memory is the dynamic allocation of one block "
        f"(limit {_sm90.SMEM_LIMIT} bytes). These are compile facts, not timings: no GPU has run them.",
        "",
        "| module | kernel | compute | config | registers | spill st/ld (bytes) | shared memory (bytes) | wgmma | mma.sync |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['module']} | {r['kernel']} | {str(r['ct']).replace('torch.', '')} | {r['config']} | "
                     f"{r['regs']} | {r['spill_st']}/{r['spill_ld']} | {r['shared']} | {r['wgmma']} | {r['mma_sync']} |")
    spills = sum(r["spill_st"] + r["spill_ld"] for r in rows)
    gemm_spills = sum(r["spill_st"] + r["spill_ld"] for r in rows if r["kernel"] in GEMM_KERNELS)
    tf32_bwd = sum(r["spill_st"] + r["spill_ld"] for r in rows if r["ct"] == "tf32" and r["kernel"] in TF32_BWD_KERNELS)
    worst = max(r["spill_st"] + r["spill_ld"] for r in rows)
    lines += ["", f"Summary (triton {triton.__version__}): {len(rows)} binaries, {spills} spill bytes in all "
              f"({gemm_spills} in GEMM kernels, {tf32_bwd} of them in the TF32 local-alignment backward kernels, the "
              f"one allowed exception; at most {worst} in one kernel, the test allows "
              f"{SPILL_BYTES_ELSEWHERE} outside the GEMMs), largest shared memory {max(r['shared'] for r in rows)} "
              f"bytes, most registers {max(r['regs'] for r in rows)}; every bf16 and TF32 GEMM kernel uses wgmma, "
              f"none mma.sync.", ""]
    with open(TABLE, "w") as f:
        f.write("\n".join(lines))


def test_every_kernel_of_both_ops_is_compiled(compiled):
    from medst_fast.kernels import local_align, move_ffn

    expected = {name for mod in (move_ffn, local_align) for name in vars(mod)
                if name.endswith("_kernel") and callable(getattr(mod, name))}
    assert {r["kernel"] for r in compiled} == expected


# The one known exception: local_align's TF32 backward kernels (fp32 operand tiles of 64 x 128 fill the registers;
# 272-976 bytes at these shapes on triton 3.8, more with 16 warps). Bounded here so that it cannot grow unseen.
TF32_BWD_KERNELS, TF32_BWD_SPILL_BYTES = {"_attn_bwd_kernel", "_s_bwd_kernel"}, 1536


def test_no_spills_in_gemm_kernels(compiled):
    bad = [(r["kernel"], r["ct"], r["config"], r["spill_st"], r["spill_ld"]) for r in compiled
           if r["kernel"] in GEMM_KERNELS and (r["spill_st"] or r["spill_ld"])
           and not (r["ct"] == "tf32" and r["kernel"] in TF32_BWD_KERNELS)]
    assert not bad, bad
    tf32 = [(r["kernel"], r["spill_st"] + r["spill_ld"]) for r in compiled
            if r["ct"] == "tf32" and r["kernel"] in TF32_BWD_KERNELS]
    assert tf32 and all(n <= TF32_BWD_SPILL_BYTES for _, n in tf32), tf32


def test_spills_elsewhere_stay_small(compiled):
    bad = [(r["kernel"], r["config"], r["spill_st"], r["spill_ld"]) for r in compiled
           if r["spill_st"] + r["spill_ld"] > SPILL_BYTES_ELSEWHERE
           and not (r["ct"] == "tf32" and r["kernel"] in TF32_BWD_KERNELS)]
    assert not bad, bad


def test_shared_memory_fits_one_sm(compiled):
    import _sm90

    bad = [(r["kernel"], r["config"], r["shared"]) for r in compiled if r["shared"] > _sm90.SMEM_LIMIT]
    assert not bad, bad


def test_tensor_core_kernels_use_wgmma(compiled):
    gemms = [r for r in compiled if r["kernel"] in GEMM_KERNELS and r["ct"] != torch.float32]
    assert len(gemms) >= 2 * len(GEMM_KERNELS)  # bf16 and TF32 variants of each
    assert len([r for r in gemms if r["ct"] == "tf32"]) >= len(GEMM_KERNELS)
    bad = [(r["kernel"], r["ct"], r["config"], r["wgmma"], r["mma_sync"]) for r in gemms
           if not r["wgmma"] or r["mma_sync"]]
    assert not bad, bad  # no bf16 or TF32 GEMM falls back to the pre-Hopper instruction


def test_tf32_launches_take_the_tf32_tiles():
    """Under precision 'high' the fp32 GEMMs are recorded with PREC tf32 and the tf32 config set's tiles."""
    from medst_fast.kernels import move_ffn as mf

    mm = [l for ct, l in tf32_launches() if l.kernel == "_grouped_mm_kernel"]
    assert mm and {l.meta["PREC"] for l in mm} == {"tf32"}
    assert {_gemm_tile(l) for l in mm} <= {tuple(c) for c in mf.GEMM_CONFIGS["tf32"]}
    assert torch.get_float32_matmul_precision() == "highest"  # restored


def test_research_switch_variants_are_compiled(compiled):
    """The uniform weighting's per-sample kernel, in every mask / size variant, is among the binaries."""
    uniform = [r for r in compiled if r["kernel"] == "_sample_kernel" and "UNIFORM" in r["config"].split()]
    learned = [r for r in compiled if r["kernel"] == "_sample_kernel" and "UNIFORM" not in r["config"].split()]
    assert uniform and len(uniform) == len(learned)


def test_batch_scope_launches_one_sample_of_the_whole_batch():
    """The batch scope's attention runs over the flattened batch (grid over one sample of B Tq rows)."""
    launches = switch_launches(40, 111, 392, True, True, torch.bfloat16)
    fwd = [l for l in launches if l.kernel == "_attn_fwd_kernel"]
    bwd = [l for l in launches if l.kernel == "_attn_bwd_kernel"]
    assert len(fwd) == 3 and len(bwd) == 3
    wide = [l for l in fwd if l.grid[1] == 1]
    assert len(wide) == 2 and all(l.args[5] == 40 * 111 and l.args[6] == 40 * 392 for l in wide)  # Tx, Ty


def _gemm_tile(launch):
    m = launch.meta
    return m["BLOCK_N"], m["BLOCK_K"], m["num_warps"], m["num_stages"]


def _wgrad_tile(launch):
    m = launch.meta
    return m["BLOCK_R"], m["BLOCK_N"], m["BLOCK_K"], m["num_warps"], m["num_stages"]


@pytest.mark.parametrize("studies", FFN_STUDIES)
def test_launch_recording_matches_the_launchers(studies):
    """The recorder sees what the launchers ask for: the table's pick per (token bucket, N, K), from the set of
    the compute dtype's kind; exact fp32 keeps its one config."""
    import _sm90
    from medst_fast.kernels import move_ffn as mf

    rec = _sm90.move_ffn_launches(studies, torch.float32, torch.bfloat16)
    mm = [l for l in rec if l.kernel == "_grouped_mm_kernel"]
    assert len(mm) == 4 and {l.meta["BLOCK_M"] for l in mm} == {128}
    for l in mm:
        slots, n, k = l.args[1].numel(), l.args[10], l.args[11]
        assert _gemm_tile(l) == tuple(mf.gemm_config(torch.bfloat16, slots, n, k)) and l.grid == (
            l.args[9] * -(-n // l.meta["BLOCK_N"]),)
        assert tuple(mf.gemm_config(torch.bfloat16, slots, n, k)) in {tuple(c) for c in mf.GEMM_CONFIGS["mma"]}
    wg = [l for l in rec if l.kernel == "_grouped_wgrad_kernel"]
    assert len(wg) == 2
    for l in wg:
        assert _wgrad_tile(l) == tuple(mf.wgrad_config(torch.bfloat16, l.args[1].numel(), l.args[5], l.args[6]))
    exact = [l for l in _sm90.move_ffn_launches(studies, torch.float32, torch.float32) if l.kernel == "_grouped_mm_kernel"]
    assert {l.meta["PREC"] for l in exact} == {"ieee"}
    assert {_gemm_tile(l) for l in exact} == {tuple(mf.GEMM_CONFIGS["fp32"][0])}


def test_the_table_picks_differ_across_buckets():
    """The lookup really is keyed on the token count: at ViT-B, 40 and 160 studies get different fc2 tiles (if
    a measured table ever makes them equal, change this test, not the table)."""
    import _sm90

    def fc2_tile(studies):
        mm = [l for l in _sm90.move_ffn_launches(studies, torch.float32, torch.bfloat16)
              if l.kernel == "_grouped_mm_kernel" and l.meta["EPI"] == 2]
        return _gemm_tile(mm[0])

    assert fc2_tile(40) != fc2_tile(160)


def test_autotune_flag_never_benchmarks_meta_or_cpu_tensors(monkeypatch):
    """MEDST_FAST_AUTOTUNE=1 switches only CUDA launches to the autotuner: the recorder on meta tensors still sees
    the table's picks, and no autotuner is built."""
    import _sm90
    from medst_fast.kernels import move_ffn as mf

    def no_autotune(*a, **k):
        raise AssertionError("autotuned a launch that is not on CUDA")

    monkeypatch.setattr(mf, "autotune_launch", no_autotune)
    plain = [_gemm_tile(l) for l in _sm90.move_ffn_launches(40, torch.float32, torch.bfloat16)
             if l.kernel == "_grouped_mm_kernel"]
    monkeypatch.setenv("MEDST_FAST_AUTOTUNE", "1")
    flagged = [_gemm_tile(l) for l in _sm90.move_ffn_launches(40, torch.float32, torch.bfloat16)
               if l.kernel == "_grouped_mm_kernel"]
    assert flagged == plain
    assert not mf.autotune_enabled(torch.empty(1), torch.bfloat16, "gemm")


@pytest.mark.parametrize("which", ["gemm", "wgrad"])
def test_every_config_of_the_sets_is_compiled_for_every_variant(compiled, which):
    """Each config of the mma set appears, compiled, in every epilogue / gather variant of its kernel."""
    from medst_fast.kernels import move_ffn as mf

    kernel = {"gemm": "_grouped_mm_kernel", "wgrad": "_grouped_wgrad_kernel"}[which]
    sets = {"gemm": mf.GEMM_CONFIGS, "wgrad": mf.WGRAD_CONFIGS}[which]
    rows = [r for r in compiled if r["kernel"] == kernel and r["ct"] == torch.bfloat16]
    strip = (lambda t: t[1:]) if which == "gemm" else (lambda t: t)  # the grouped GEMM has no BLOCK_R
    variants = {}  # (argument dtypes, epilogue and flags) -> the tiles compiled for it
    for r in rows:
        words = r["config"].split()
        v = (r["signature"], r["config"].split(" BLOCK_")[0], tuple(w for w in words if w in ("A_GATHER", "B_NCONTIG")))
        variants.setdefault(v, set()).add(strip(r["tile"]))
    want = {tuple(c) for c in sets["mma"]}
    assert len(variants) >= 2 and len(want) >= 3
    for v, tiles in variants.items():
        assert want <= tiles, (v, want - tiles)
