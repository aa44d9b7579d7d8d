"""The Triton decode-attention kernel (:mod:`nqcompile.kernels.decode_attention`) against the torch reference ops.

Without a GPU the kernel runs under Triton's interpreter on CPU tensors (``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before Triton is imported), with tiny shapes (the interpreter runs every program in Python);
the module is skipped where neither CUDA nor the interpreter is available, or Triton is not installed. The ``gpu``
tests run realistic shapes on CUDA.

Every input is fresh and random: keys and values (with a per-channel offset) coded by ``nqcompile::write_kv``,
ragged code lengths per sequence, a warm tier with holes in its mask, a partly masked exact segment.
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton")
ON_GPU = torch.cuda.is_available()
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("neither CUDA nor TRITON_INTERPRET=1", allow_module_level=True)

import triton.language as tl  # noqa: E402

from nqcompile import ops  # noqa: E402
from nqcompile.codec.hadamard import hadamard_matrix  # noqa: E402
from nqcompile.codec.registry import code_for  # noqa: E402
from nqcompile.kernels import decode_attention as K  # noqa: E402
from nqcompile.kernels import launch_configs as LC  # noqa: E402
from nqcompile.kernels import lattice as L  # noqa: E402
from nqcompile.ops import cuda as ops_cuda  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


@triton.jit
def _codewords_kernel(codes, out, n, ROW_BYTES: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = t < n
    c = L.e8_codewords(codes + t * ROW_BYTES, 1, live, BITS, D, BLOCK_N, BLOCK_D)
    r = tl.arange(0, BLOCK_D)
    tl.store(out + t[:, None] * D + r[None, :], c, mask=live[:, None] & (r < D)[None, :])


def test_the_kernel_module_runs_where_the_tests_run():
    """On a machine without CUDA the kernels were decorated for the interpreter (else every test below would fail
    with a driver error instead of checking anything): Triton was not imported before conftest set the variable."""
    assert ON_GPU or type(K._code_split_kernel).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dim", [64, 96])
def test_codewords_in_registers_are_the_codecs_bit_for_bit(bits, dim):
    """The in-register E8 decode (labels -> k G -> Voronoi representative) equals E8LatticeCode.codewords exactly,
    on random labels (every codeword is reachable), dead rows and padded columns included."""
    g = torch.Generator().manual_seed(bits * 1000 + dim)
    n = 77  # not a multiple of the block: the last block has dead rows
    codes = torch.randint(0, 256, (n, bits * dim // 8), dtype=torch.uint8, generator=g)
    ref = code_for("e8", bits).codewords(codes, dim).reshape(n, dim)
    out = torch.full((n, dim), float("nan"), device=DEVICE)
    _codewords_kernel[(triton.cdiv(n, 32),)](codes.to(DEVICE), out, n, bits * dim // 8, bits, dim, 32,
                                            L.pow2(dim))
    assert torch.equal(out.cpu(), ref)


def _case(batch=2, heads=2, group=4, dim=64, capacity=64, warm=16, exact=5, key_bits=4, value_bits=2, warm_bits=4,
          rotary_dim=None, layout="half", dtype=torch.bfloat16, lengths=None, seed=0, device=DEVICE):
    """Random inputs of ``nqcompile::cache_attention`` (no write) for one query per sequence, as a dict of its
    keyword arguments (``warm_offset`` 1)."""
    g = torch.Generator().manual_seed(seed)
    rotary_dim = dim if rotary_dim is None else rotary_dim
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    hadamard = hadamard_matrix(dim)
    norm_mean = torch.randn(2, batch, heads, dim, generator=g) * 0.5
    norm_scale = torch.rand(2, batch, heads, dim, generator=g) + 0.5

    def coded(n, kbits, vbits, count, first_pos):
        kc = torch.zeros(batch, heads, n, kbits * dim // 8, dtype=torch.uint8)
        vc = torch.zeros(batch, heads, n, vbits * dim // 8, dtype=torch.uint8)
        ks, vs = torch.zeros(batch, heads, n, dtype=torch.uint8), torch.zeros(batch, heads, n, dtype=torch.uint8)
        key = torch.randn(batch, heads, n, dim, generator=g) * 2 + torch.randn(dim, generator=g)
        value = torch.randn(batch, heads, n, dim, generator=g)
        pos = (torch.arange(n) + first_pos).expand(batch, heads, n).contiguous()
        ops.write_kv(kc, ks, vc, vs, key, value, pos, torch.zeros(batch, dtype=torch.long), count, hadamard, inv_freq,
                     norm_mean, norm_scale, "e8", kbits, vbits, 1.0, rotary_dim, layout)
        return kc, ks, vc, vs, pos

    code_len = torch.tensor(lengths if lengths is not None else [capacity - 7, capacity // 2 + 3][:batch])
    k_codes, k_scales, v_codes, v_scales, code_pos = coded(capacity, key_bits, value_bits, code_len, 3)
    args = dict(query=(torch.randn(batch, heads * group, 1, dim, generator=g) * 1.5).to(dtype),
                k_codes=k_codes, k_scales=k_scales, v_codes=v_codes, v_scales=v_scales, code_pos=code_pos,
                code_len=code_len, warm_k_codes=None, warm_k_scales=None, warm_v_codes=None, warm_v_scales=None,
                warm_pos=None, warm_mask=None, warm_offset=1, warm_bits=warm_bits)
    if warm:
        wkc, wks, wvc, wvs, wpos = coded(warm, warm_bits, warm_bits, torch.full((batch,), warm), capacity + 3)
        args.update(warm_k_codes=wkc, warm_k_scales=wks, warm_v_codes=wvc, warm_v_scales=wvs, warm_pos=wpos,
                    warm_mask=torch.rand(batch, 1, warm, generator=g) < 0.7)
    args.update(exact_k=torch.randn(batch, heads, exact, dim, generator=g).to(dtype),
                exact_v=torch.randn(batch, heads, exact, dim, generator=g).to(dtype),
                exact_mask=torch.rand(batch, 1, exact, generator=g) < 0.8,
                new_k=None, new_v=None, new_pos=None, new_dest=None, new_count=None,
                hadamard=hadamard, inv_freq=inv_freq, norm_mean=norm_mean, norm_scale=norm_scale, kind="e8",
                key_bits=key_bits, value_bits=value_bits, attention_scaling=1.0, rotary_dim=rotary_dim,
                layout=layout, scaling=dim ** -0.5)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _kernel(a):
    """The kernel op on a :func:`_case`."""
    return K.e8_decode_attention(
        a["query"], a["k_codes"], a["k_scales"], a["v_codes"], a["v_scales"], a["code_pos"], a["code_len"],
        a["warm_k_codes"], a["warm_k_scales"], a["warm_v_codes"], a["warm_v_scales"], a["warm_pos"], a["warm_mask"],
        a["warm_bits"], a["exact_k"], a["exact_v"], a["exact_mask"], a["hadamard"], a["inv_freq"], a["norm_mean"],
        a["norm_scale"], K.centroid_table(a["query"].device), a["key_bits"], a["value_bits"],
        a["attention_scaling"], a["rotary_dim"], a["layout"], a["scaling"])


def _reference(a, dtype=None):
    """``nqcompile::cache_attention``'s torch reference on a :func:`_case` (the query cast to ``dtype``)."""
    a = dict(a, query=a["query"] if dtype is None else a["query"].to(dtype))
    return ops.fused.cache_attention_reference(**a)


def _relative_error(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _check(a, tolerance=1e-2):
    out = _kernel(a)
    assert out.shape == a["query"].shape and out.dtype == a["query"].dtype and out.is_contiguous()
    exact = _reference(a, torch.float64)
    err, ref_err = _relative_error(out, exact), _relative_error(_reference(a), exact)
    assert err < tolerance, f"relative error {err:.2e} vs the float64 reference"
    # Not measurably worse than the torch reference in the same dtype (both round the output to it).
    assert err < 1.5 * ref_err + 1e-6, f"relative error {err:.2e}, the torch reference's {ref_err:.2e}"


@pytest.mark.parametrize("key_bits,value_bits", [(4, 2), (3, 2)], ids=["K4V2", "K3V2"])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dim", [64, 96, 128])
def test_matches_the_reference(dim, group, key_bits, value_bits):
    """quant_only (K4 V2) and asym (K3 V2) codes, GQA groups 1 and 4, head_dim 64, 96 (a Paley Hadamard matrix,
    padded to 128 lanes) and 128; batch 2 with different code lengths; codes, warm tier and exact segment."""
    _check(_case(dim=dim, group=group, key_bits=key_bits, value_bits=value_bits, seed=dim + group + key_bits))


@pytest.mark.parametrize("key_bits", [2, 3, 4])
@pytest.mark.parametrize("value_bits", [2, 3, 4])
def test_every_bit_width(key_bits, value_bits):
    """Every key and value width the codec offers (the warm tier at a third width), batch 1."""
    warm_bits = {2: 3, 3: 4, 4: 2}[value_bits]
    _check(_case(batch=1, group=2, capacity=48, key_bits=key_bits, value_bits=value_bits, warm_bits=warm_bits,
                 seed=10 * key_bits + value_bits))


@pytest.mark.parametrize("layout,rotary_dim", [("interleaved", 64), ("half", 32), ("interleaved", 48)])
def test_rope_layouts_and_partial_rotary(layout, rotary_dim):
    """Interleaved pairs and partial rotary (the dims past rotary_dim pass unrotated and unscaled), with an
    attention_scaling != 1 and positions far from 0 (the angle reduction)."""
    a = _case(layout=layout, rotary_dim=rotary_dim, seed=rotary_dim)
    a["code_pos"] = a["code_pos"] * 997 + 40000
    _check(dict(a, attention_scaling=1.3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_query_dtypes(dtype):
    """float16 and float32 queries (float32: within float32 rounding of the float64 reference)."""
    a = _case(dtype=dtype, seed=7)
    _check(a, tolerance=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("config,splits", [
    (LC.DecodeConfig(16, 2, 1), (96, 32)), (LC.DecodeConfig(64, 8, 4), (64, 64)), (LC.DecodeConfig(16, 4, 8), (16, 16)),
], ids=["16x2x1", "64x8x4", "16x4x8"])
def test_any_table_configuration_matches_the_reference(config, splits, monkeypatch):
    """A launch table entry other than the default (slots per block, warps, programs per multiprocessor), for the
    codes (96 slots) and the warm tier (32 slots), gives the attention of the torch reference: a table entry can
    change the speed only. The kernel is launched with the entry and the split it implies (4 (sequence, KV head)
    pairs, 4 multiprocessors off CUDA: 16 x 2 x 1 one split, 64 x 8 x 4 two, 16 x 4 x 8 one per block)."""
    a = _case(capacity=96, warm=32, seed=31)
    table = LC.LaunchTable({}, {(64, 4, 2, "<=8K"): config, (64, 4, 4, "<=8K"): config}, {})
    launched, launch = [], K.code_split_partials
    monkeypatch.setattr(K, "code_split_partials",
                        lambda *args, **kwargs: launched.append((kwargs["config"], kwargs["split"]))
                        or launch(*args, **kwargs))
    with LC.using(table):
        _check(a)
    assert [c for c, _ in launched] == [config, config]
    if not ON_GPU:  # 4 stand-in multiprocessors: the splits are known
        assert [s for _, s in launched] == list(splits)


def test_partials_overwrite_every_element():
    """Poisoned (NaN) partial buffers: every split writes its o, m, l, including splits past a sequence's code
    length (m = -inf, l = 0, o = 0), and a sequence with no codes at all; merged, they are the attention over the
    codes."""
    a = _case(capacity=96, lengths=[70, 0], warm=0)
    batch, q_heads, _, dim = a["query"].shape
    config = LC.default_decode_config(dim)
    split = config.block
    n_splits = triton.cdiv(96, split)
    o = torch.full((batch, q_heads, n_splits, dim), float("nan"), device=DEVICE)
    m, l = torch.full_like(o[..., 0], float("nan")), torch.full_like(o[..., 0], float("nan"))
    hadamard_pm1 = (a["hadamard"] * dim ** 0.5).to(torch.float16)
    K.code_split_partials(a["query"], a["k_codes"], a["k_scales"], a["v_codes"], a["v_scales"], a["code_pos"],
                          a["code_len"], hadamard_pm1, a["inv_freq"], a["norm_mean"][0], a["norm_scale"][0],
                          K.centroid_table(DEVICE), key_bits=4, value_bits=2, attention_scaling=1.0, rotary_dim=dim,
                          layout="half", scaling=a["scaling"], by_mask=False, split=split, config=config,
                          out=(o, m, l))
    assert not (o.isnan().any() or m.isnan().any() or l.isnan().any())
    seen = torch.tensor([[True, True, True], [False, False, False]], device=DEVICE)[:, None, :]  # 70 of 96 slots
    assert torch.equal(m.isfinite(), seen.expand_as(m)) and torch.equal(l > 0, seen.expand_as(l))
    assert torch.equal(o[~seen.expand_as(m)], torch.zeros_like(o[~seen.expand_as(m)]))
    # The merged result of the partials is the attention over the 70 held slots.
    out = K.merge_partials([(o, m, l)], None, a["hadamard"], a["norm_mean"][1], a["norm_scale"][1]).unsqueeze(2)
    ref = ops.dequant_attention(a["query"].double(), a["k_codes"], a["k_scales"], a["v_codes"], a["v_scales"],
                                a["code_pos"], a["code_len"], a["exact_k"][:, :, :0], a["exact_v"][:, :, :0],
                                a["exact_mask"][:, :, :0], a["hadamard"], a["inv_freq"], a["norm_mean"],
                                a["norm_scale"], "e8", 4, 2, 1.0, dim, "half", a["scaling"])
    assert _relative_error(out, ref) < 1e-5  # sequence 1 sees nothing: zero, as the reference


def test_a_query_that_sees_nothing_gets_zeros():
    """No codes held, warm and exact tokens all masked: a zero output (the reference's convention), never NaN."""
    a = _case(batch=1, lengths=[0], seed=3)
    a["warm_mask"] = torch.zeros_like(a["warm_mask"])
    a["exact_mask"] = torch.zeros_like(a["exact_mask"])
    out = _kernel(a)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(_reference(a), out)


def test_opcheck():
    """The triton_op passes torch.library.opcheck: its schema everywhere, its fake (meta) implementation on CUDA
    (under the interpreter ``wrap_triton`` hands back the plain kernel, which cannot run on fake tensors)."""
    a = _case(batch=1, group=2, capacity=32, warm=16, seed=5)
    args = (a["query"], a["k_codes"], a["k_scales"], a["v_codes"], a["v_scales"], a["code_pos"], a["code_len"],
            a["warm_k_codes"], a["warm_k_scales"], a["warm_v_codes"], a["warm_v_scales"], a["warm_pos"],
            a["warm_mask"], a["warm_bits"], a["exact_k"], a["exact_v"], a["exact_mask"], a["hadamard"],
            a["inv_freq"], a["norm_mean"], a["norm_scale"], K.centroid_table(DEVICE), 4, 2, 1.0, 64, "half",
            a["scaling"])
    utils = ("test_schema", "test_faketensor") if ON_GPU else ("test_schema",)
    torch.library.opcheck(K.e8_decode_attention, args, test_utils=utils)


# The kernel compiled for an H100/H200 (sm_90) by Triton's own compiler and ptxas, in a fresh interpreter without
# TRITON_INTERPRET: no GPU needed, so the CPU runs catch what only the GPU compiler checks (dot shapes, layouts,
# shared memory). Prints one JSON line per configuration: its shared memory in bytes.
_SM90_COMPILE = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nqcompile.kernels import decode_attention as K
from nqcompile.kernels import lattice as L
from nqcompile.kernels.launch_configs import default_decode_config

POINTERS = dict(q_ptr="*bf16", kc_ptr="*u8", ks_ptr="*u8", vc_ptr="*u8", vs_ptr="*u8", pos_ptr="*i64",
                hpm_ptr="*fp16", freq_ptr="*fp32", mean_ptr="*fp32", scale_ptr="*fp32", cent_ptr="*fp32",
                o_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32")
FLOATS = ("qk_scale", "key_unit", "value_gain", "attention_scaling")
for group, dim, key_bits, value_bits, by_mask, interleaved in [(1, 64, 4, 2, False, False), (4, 128, 3, 2, True, True),
                                                              (8, 96, 2, 4, False, False), (8, 256, 4, 2, True, False)]:
    block, warps, _ = default_decode_config(dim)
    constants = dict(G=group, D=dim, ROTARY=dim, INTERLEAVED=interleaved, KEY_BITS=key_bits, VALUE_BITS=value_bits,
                     BY_MASK=by_mask, BLOCK_N=block, BLOCK_G=L.pow2(group), BLOCK_D=L.pow2(dim),
                     BLOCK_P=L.pow2(dim // 2), TWO_PI=K._TWO_PI)
    fn = K._code_split_kernel
    signature = {name: "constexpr" if name in constants else POINTERS.get(name, "fp32" if name in FLOATS else "i32")
                 for name in fn.arg_names}
    signature["lim_ptr"] = "*i1" if by_mask else "*i64"
    kernel = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps))
    print(json.dumps(dict(dim=dim, group=group, shared=kernel.metadata.shared)))
"""


def test_the_kernel_compiles_for_sm90():
    """Triton compiles the kernel to a cubin for sm_90 at head_dim 64 to 256, GQA groups 1 to 8, every bit width, both
    validity modes and both RoPE layouts, within the 227 KiB of shared memory a block may use there."""
    from sm90 import compile_for_sm90

    compiled = compile_for_sm90(_SM90_COMPILE)
    assert len(compiled) == 4 and all(c["shared"] <= 227 * 1024 for c in compiled), compiled


# ---------------------------------------------------------------------------------------------------- dispatch


def _dequant_args(a):
    """``nqcompile::dequant_attention``'s arguments for a :func:`_case` without a warm tier."""
    names = ("query", "k_codes", "k_scales", "v_codes", "v_scales", "code_pos", "code_len", "exact_k", "exact_v",
             "exact_mask", "hadamard", "inv_freq", "norm_mean", "norm_scale", "kind", "key_bits", "value_bits",
             "attention_scaling", "rotary_dim", "layout", "scaling")
    return [a[n] for n in names]


def test_the_attention_ops_have_cuda_implementations():
    """Importing nqcompile registers the CUDA implementations (ops.cuda) with the dispatcher."""
    for name in ("nqcompile::dequant_attention", "nqcompile::cache_attention"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name


def test_cuda_implementations_run_the_kernel_on_decode_steps():
    """The CUDA implementations of dequant_attention and cache_attention (called directly here, on the tensors the
    tests run on) take the kernel for a decode step; cache_attention writes the new block first, as the
    reference does."""
    a = _case(warm=0, seed=11)
    assert ops_cuda.decode_kernel_reason(a["query"], 2, a["code_len"], a["exact_mask"], "e8", (4, 2), 64, "half",
                                         a["inv_freq"]) is None
    assert torch.equal(ops_cuda.dequant_attention_cuda(*_dequant_args(a)), _kernel(a))

    b = _case(seed=12, lengths=[40, 20])
    g = torch.Generator().manual_seed(13)
    new = dict(new_k=torch.randn(2, 2, 16, 64, generator=g).to(DEVICE),
               new_v=torch.randn(2, 2, 16, 64, generator=g).to(DEVICE),
               new_pos=(torch.arange(16) + 200).expand(2, 2, 16).contiguous().to(DEVICE),
               new_dest=torch.tensor([40, 20], device=DEVICE), new_count=torch.tensor([16, 9], device=DEVICE))
    b_ref = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
    b.update(new, code_len=torch.tensor([56, 29], device=DEVICE))
    b_ref.update(new, code_len=torch.tensor([56, 29], device=DEVICE))
    out = ops_cuda.cache_attention_cuda(**b)
    ref = ops.fused.cache_attention_reference(**b_ref)
    for name in ("k_codes", "k_scales", "v_codes", "v_scales"):
        assert torch.equal(b[name], b_ref[name]), name
    assert _relative_error(out, ref) < 1e-2


@pytest.mark.parametrize("change,reason", [
    (dict(query_len=3), "one query per sequence"),
    (dict(kind="uniform"), "E8 codes"),
    (dict(dtype=torch.float64), "query dtype"),
    (dict(key_bits=5), "bit widths"),
])
def test_other_calls_fall_back_to_the_reference(change, reason):
    """Calls the kernel does not cover run the torch reference (the same result bit for bit), and the reason
    says why."""
    a = _case(warm=0, seed=21)
    q_len = change.get("query_len", 1)
    args = _dequant_args(a)
    args[0] = torch.randn(2, 8, q_len, 64).to(change.get("dtype", torch.bfloat16)).to(DEVICE)
    if q_len > 1:
        args[6] = a["code_len"][:, None].expand(2, q_len).contiguous()
        args[9] = a["exact_mask"].expand(2, q_len, a["exact_mask"].shape[2]).contiguous()
    if "kind" in change:
        args[14] = change["kind"]
    if "key_bits" in change:
        args[15] = change["key_bits"]
    why = ops_cuda.decode_kernel_reason(args[0], 2, args[6], args[9], args[14], (args[15], args[16]), 64, "half",
                                        a["inv_freq"])
    assert why is not None and reason in why, why
    if "key_bits" in change or "kind" in change:
        return  # the codes were written as E8 at 4 bits: only the reason is checked
    assert torch.equal(ops_cuda.dequant_attention_cuda(*args), ops.dequant_attention(*args))


def test_head_dims_without_a_pm1_hadamard_matrix_are_refused():
    """184 gets the DCT fallback rotation (not ±1 entries): the kernel is not used."""
    query = torch.zeros(1, 2, 1, 184)
    why = ops_cuda.decode_kernel_reason(query, 2, torch.zeros(1, dtype=torch.long),
                                        torch.zeros(1, 1, 0, dtype=torch.bool), "e8", (4, 2), 184, "half",
                                        torch.zeros(92))
    assert why is not None and "Hadamard" in why


# ---------------------------------------------------------------------------------------------------- GPU sizes


@pytest.mark.gpu
@pytest.mark.parametrize("key_bits,value_bits", [(4, 2), (3, 2)], ids=["K4V2", "K3V2"])
@pytest.mark.parametrize("dim,group", [(128, 4), (64, 8), (96, 1)])
def test_realistic_sizes_on_gpu(dim, group, key_bits, value_bits):
    """Thousands of code slots, a 256-token warm tier, ragged lengths, on CUDA through the ops' dispatch."""
    a = _case(batch=3, heads=4, group=group, dim=dim, capacity=4096, warm=256, exact=80, key_bits=key_bits,
              value_bits=value_bits, lengths=[4096, 1500, 17], seed=dim * group + key_bits, device="cuda")
    _check(a)
    assert torch.equal(ops.cache_attention(**a), _kernel(a))


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["quant_only", "asym", "balanced"])
def test_generation_on_gpu_runs_the_kernel_and_decodes_like_the_reference(preset, monkeypatch):
    """A tiny float32 Llama (GQA) decoding on CUDA through NexusCache (its window in bf16, ``window_dtype``): every
    decode step's attention takes the kernel, and the logits match a run where the CUDA implementations are forced
    onto the torch reference."""
    import sys

    import nqcompile

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_models import prefill_and_decode, tiny_model

    opts = dict(sink_tokens=4, recent_window=16, warm_tokens=32, min_evict_tokens=0, relax_key_kl=0.0,
                keep_line_breaks=False)
    ids = torch.randint(1, 256, (2, 150), generator=torch.Generator().manual_seed(1)).cuda()
    calls = []
    kernel_op = K.e8_decode_attention
    monkeypatch.setattr(K, "e8_decode_attention", lambda *args: calls.append(1) or kernel_op(*args))
    logits = {}
    for path in ("kernel", "reference"):
        if path == "reference":
            monkeypatch.setattr(ops_cuda, "_kernel", lambda: None)
        model = tiny_model("llama").cuda()
        nqcompile.optimize(model, preset, **opts)
        cache = nqcompile.NexusCache(model.config, preset, max_cache_len=150 + 41, **opts)
        with torch.no_grad():
            logits[path] = prefill_and_decode(model, ids, cache, 40)
        if path == "kernel":
            assert len(calls) == 40 * model.config.num_hidden_layers
    torch.testing.assert_close(logits["kernel"], logits["reference"], atol=2e-3, rtol=1e-3)


@pytest.mark.gpu
def test_reduce_overhead_decode_as_the_first_step_on_gpu(fresh_dynamo, monkeypatch):
    """A decode step compiled with ``mode="reduce-overhead"`` run as the very first step after the prefill, so that
    the kernel's device tables are first needed inside Inductor's CUDA-graph warm-up (an H200 run refused the graph
    when such a table was allocated in the graphs' pool), decodes the same greedy tokens as the eager model."""
    import sys

    import nqcompile
    from nqcompile.codec import constants

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_models import greedy_tokens, tiny_model

    monkeypatch.setattr(constants, "_COPIES", {})  # no table on the GPU yet
    opts = dict(sink_tokens=4, recent_window=16, warm_tokens=32, min_evict_tokens=0, relax_key_kl=0.0)
    model = tiny_model("llama").cuda()
    nqcompile.optimize(model, "quant_only", **opts)
    ids = torch.randint(1, 256, (1, 150), generator=torch.Generator().manual_seed(2)).cuda()
    step = torch.compile(model.forward, backend=nqcompile.compile.nexusquant, mode="reduce-overhead", fullgraph=True)
    compiled = greedy_tokens(model, ids, step, 40)
    assert compiled == greedy_tokens(model, ids, model.forward, 40)


def test_benchmark_smoke(tmp_path, capsys):
    """benchmarks/decode_attention.py --smoke runs (the kernel, the reference and SDPA on tiny CPU shapes) and
    writes its rows; the kernel agrees with the reference there."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_attention.py"
    spec = importlib.util.spec_from_file_location("decode_attention_benchmark", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "decode.json"
    flags = ["--smoke", "--out", str(out)] + ([] if not ON_GPU else ["--device", "cuda"])
    assert module.main(flags) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["bits"] for r in rows] == ["K4V2", "K3V2"]
    assert all(r["kernel_us"] > 0 and r["sdpa_us"] > 0 and r["rel_err"] < 1e-5 for r in rows), rows
    assert all(r["mb_read"] > 0 and r["speedup"] == r["sdpa_us"] / r["kernel_us"] for r in rows), rows
    assert "| shape | batch | T | bits | kernel us |" in capsys.readouterr().out
