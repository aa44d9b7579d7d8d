"""``decode_keys`` on the CPU: the kernel Inductor builds for the de-normalization and RoPE after the Hadamard
product gives the keys of the reference formula (dequantize, ``@ H``, ``* scale + mean``, ``apply_rotary``) bit for
bit."""

import pytest
import torch

from nqcompile.codec import cpu_kernel as kernel_module
from nqcompile.codec import kv as kv_module
from nqcompile.codec.hadamard import hadamard_matrix
from nqcompile.codec.kv import (KVTransform, _denormalize_rotate_kernel, _fused_kernel, decode_keys, decode_values,
                                encode_keys, encode_values, fold_values)
from nqcompile.codec.registry import code_for
from nqcompile.codec.rope import apply_rotary, rotary_cos_sin
from nqcompile.codec.vector import dequantize_vectors


def reference_keys(codes, scale_codes, positions, hadamard, inv_freq, mean, scale, t):
    """The key decoder as written before the kernel: one eager op at a time."""
    x = dequantize_vectors(codes, scale_codes, code_for(t.kind, t.key_bits), hadamard.shape[0]) @ hadamard
    pre = x * scale[:, :, None] + mean[:, :, None]
    return apply_rotary(pre, positions, inv_freq, attention_scaling=t.attention_scaling, rotary_dim=t.rotary_dim,
                        layout=t.layout)


def _rope_and_norm(g, batch, heads, n, dim, rotary_dim, shared, position_dtype):
    """Random positions (``[batch, 1 or heads, n]``), RoPE frequencies, the Hadamard matrix and per-channel key
    statistics, drawn from ``g`` after the keys."""
    positions = torch.randint(0, 20000, (batch, 1 if shared else heads, n), generator=g).to(position_dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    hadamard = hadamard_matrix(dim)
    mean = torch.randn(batch, heads, dim, generator=g)
    scale = torch.rand(batch, heads, dim, generator=g) + 0.5
    return positions, inv_freq, hadamard, mean, scale


CASES = [  # batch, heads, tokens, head_dim, rotary_dim, layout, attention_scaling, positions shared by heads, bits
    (1, 3, 700, 64, 64, "half", 1.0, True, 4),
    (2, 2, 37, 64, 32, "interleaved", 1.3, False, 3),
    (1, 1, 1, 128, 128, "half", 1.0, False, 2),
    (1, 4, 5, 80, 64, "half", 0.9, True, 4),
]


@pytest.mark.parametrize("batch,heads,n,dim,rotary_dim,layout,scaling,shared,bits", CASES)
@pytest.mark.parametrize("position_dtype", [torch.int16, torch.int64])
def test_decode_keys_kernel_equals_reference(batch, heads, n, dim, rotary_dim, layout, scaling, shared, bits,
                                             position_dtype, monkeypatch):
    monkeypatch.setattr(kv_module, "_fused_kernel", lambda *args: None)  # the de-normalization kernel alone
    g = torch.Generator().manual_seed(n + dim)
    t = KVTransform("e8", bits, bits, scaling, rotary_dim, layout)
    key = torch.randn(batch, heads, n, dim, generator=g) * 3
    positions, inv_freq, hadamard, mean, scale = _rope_and_norm(g, batch, heads, n, dim, rotary_dim, shared,
                                                                position_dtype)
    codes, scale_codes = encode_keys(key, positions.expand(batch, heads, n), hadamard, inv_freq, mean, scale, t)
    cos, _ = rotary_cos_sin(positions, inv_freq, attention_scaling=scaling, layout=layout)
    # the kernel path is the one under test
    assert _denormalize_rotate_kernel(key.float(), scale, mean, cos, cos, layout=layout) is not None
    out = decode_keys(codes, scale_codes, positions, hadamard, inv_freq, mean, scale, t)
    expected = reference_keys(codes, scale_codes, positions, hadamard, inv_freq, mean, scale, t)
    assert out.dtype == torch.float32 and out.shape == (batch, heads, n, dim)
    assert torch.equal(out, expected)
    # and the keys are the input's up to quantization error (a real decode, not two equal wrong answers)
    error = (out - key).square().mean() / key.square().mean()
    assert error < {2: 0.2, 3: 0.05, 4: 0.02}[bits]


def test_decode_keys_without_kernel_equals_reference(monkeypatch):
    """Where Inductor cannot build the kernel (cpu_kernel returns None), the eager ops give the same keys."""
    monkeypatch.setattr(kernel_module, "_KERNELS", {})
    monkeypatch.setattr(kernel_module, "_build", lambda name, fn, example: None)
    g = torch.Generator().manual_seed(5)
    t = KVTransform("e8", 4, 2, 1.0, 64, "half")
    hadamard, inv_freq = hadamard_matrix(64), 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    key, positions = torch.randn(1, 3, 50, 64, generator=g), torch.arange(50)[None, None]
    mean, scale = torch.randn(1, 3, 64, generator=g), torch.rand(1, 3, 64, generator=g) + 0.5
    codes, scale_codes = encode_keys(key, positions.expand(1, 3, 50), hadamard, inv_freq, mean, scale, t)
    out = decode_keys(codes, scale_codes, positions, hadamard, inv_freq, mean, scale, t)
    assert torch.equal(out, reference_keys(codes, scale_codes, positions, hadamard, inv_freq, mean, scale, t))


def test_kernels_are_built_per_thread_count(monkeypatch):
    """Inductor bakes the thread count into a kernel: another count gets its own build."""
    monkeypatch.setattr(kernel_module, "_KERNELS", {})
    built = []
    monkeypatch.setattr(kernel_module, "_build", lambda name, fn, example: built.append(name) or fn)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 1):
            torch.set_num_threads(count)
            assert kernel_module.cpu_kernel("test_double", lambda a: 2 * a, torch.zeros(3))(torch.ones(2)).tolist() \
                == [2.0, 2.0]
    finally:
        torch.set_num_threads(threads)
    assert built == ["test_double", "test_double"]


FUSED_CASES = [  # batch, heads, tokens, head_dim, rotary_dim, layout, attention_scaling, positions shared, bits,
    # position dtype (a kernel is built for each case: few cases, since each build takes a while on the CPU)
    (1, 3, 700, 64, 64, "half", 1.0, True, 4, torch.int64),  # a layer's codes at implicit positions
    (1, 3, 333, 64, 64, "half", 1.0, False, 3, torch.int16),  # stored positions (an evicting layer, the warm tier)
    (2, 2, 37, 64, 32, "interleaved", 1.3, False, 3, torch.int64),
    (1, 4, 5, 80, 64, "half", 0.9, True, 4, torch.int16),
]


@pytest.mark.parametrize("batch,heads,n,dim,rotary_dim,layout,scaling,shared,bits,position_dtype", FUSED_CASES)
def test_fused_decode_equals_reference(batch, heads, n, dim, rotary_dim, layout, scaling, shared, bits,
                                       position_dtype):
    """The fused CPU kernel (E8 decode from the codes' words, scale, Hadamard, de-normalization, RoPE) gives the
    reference keys and values bit for bit, on codes that are rows of a larger buffer, as the cache's are."""
    g = torch.Generator().manual_seed(3 * n + bits)
    t = KVTransform("e8", bits, bits, scaling, rotary_dim, layout)
    key, value = torch.randn(2, batch, heads, n, dim, generator=g) * 3
    positions, inv_freq, hadamard, mean, scale = _rope_and_norm(g, batch, heads, n, dim, rotary_dim, shared,
                                                                position_dtype)
    codes, scale_codes = encode_keys(key, positions.expand(batch, heads, n), hadamard, inv_freq, mean, scale, t)
    v_codes, v_scales = encode_values(value, hadamard, mean, scale, t)
    # held as the first n slots of larger buffers
    buffers = [torch.zeros(batch, heads, n + 4, *c.shape[3:], dtype=c.dtype) for c in (codes, scale_codes, v_codes,
                                                                                      v_scales)]
    for buf, c in zip(buffers, (codes, scale_codes, v_codes, v_scales)):
        buf[:, :, :n] = c
    codes, scale_codes, v_codes, v_scales = (buf[:, :, :n] for buf in buffers)
    assert _fused_kernel(code_for("e8", bits), codes, scale_codes, hadamard, mean, scale, positions, inv_freq,
                         t) is not None  # the fused path is the one under test
    out = decode_keys(codes, scale_codes, positions, hadamard, inv_freq, mean, scale, t)
    expected = reference_keys(codes, scale_codes, positions, hadamard, inv_freq, mean, scale, t)
    assert out.dtype == torch.float32 and out.shape == (batch, heads, n, dim)
    assert torch.equal(out, expected)
    values = decode_values(v_codes, v_scales, hadamard, mean, scale, t)
    reference_values = fold_values(dequantize_vectors(v_codes, v_scales, code_for("e8", bits), dim), None, hadamard,
                                   mean, scale)
    assert torch.equal(values, reference_values)
    assert (out - key).square().mean() / key.square().mean() < {3: 0.05, 4: 0.02}[bits]
