"""torch.library.opcheck for every op in nqcompile.ops, and the ops against a float reference."""

import pytest
import torch

from nqcompile import ops
from nqcompile.codec.hadamard import hadamard_matrix
from nqcompile.codec.kv import KVTransform, decode_keys, decode_values


def _storage(kind, b=2, h=2, cap=32, d=64, kb=3, vb=2):
    if kind == "exact":
        return (torch.zeros(b, h, cap, d), torch.zeros(b, h, 0, dtype=torch.uint8),
                torch.zeros(b, h, cap, d), torch.zeros(b, h, 0, dtype=torch.uint8))
    return (torch.zeros(b, h, cap, kb * d // 8, dtype=torch.uint8), torch.zeros(b, h, cap, dtype=torch.uint8),
            torch.zeros(b, h, cap, vb * d // 8, dtype=torch.uint8), torch.zeros(b, h, cap, dtype=torch.uint8))


def _codec(b=2, h=2, d=64):
    g = torch.Generator().manual_seed(0)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    return (hadamard_matrix(d), inv_freq, torch.randn(2, b, h, d, generator=g) * 0.1, torch.rand(2, b, h, d, generator=g) + 0.5)


@pytest.mark.parametrize("kind", ["exact", "e8"])
def test_opcheck_write_kv(kind):
    g = torch.Generator().manual_seed(1)
    store = _storage(kind)
    key, value = torch.randn(2, 2, 5, 64, generator=g), torch.randn(2, 2, 5, 64, generator=g)
    pos = torch.arange(5).expand(2, 2, 5).contiguous()
    args = (*store, key, value, pos, torch.tensor([0, 3]), torch.tensor([5, 2]), *_codec(), kind, 3, 2, 1.0, 64, "half")
    torch.library.opcheck(ops.write_kv, args)


def test_opcheck_gather_tokens():
    x = torch.randn(2, 3, 10, 8)
    index = torch.tensor([0, 2, 5, 9]).expand(2, 3, 4).contiguous()
    torch.library.opcheck(ops.gather_tokens, (x, index))
    torch.testing.assert_close(ops.gather_tokens(x, index), x[:, :, [0, 2, 5, 9]])


@pytest.mark.parametrize("kind", ["exact", "e8"])
def test_opcheck_dequant_attention(kind):
    g = torch.Generator().manual_seed(2)
    store = _storage(kind)
    q = torch.randn(2, 4, 3, 64, generator=g)
    ek, ev = torch.randn(2, 2, 6, 64, generator=g), torch.randn(2, 2, 6, 64, generator=g)
    mask = torch.ones(2, 3, 6, dtype=torch.bool)
    pos = torch.arange(32).expand(2, 1, 32).contiguous()
    args = (q, *store, pos, torch.tensor([4, 0]), ek, ev, mask, *_codec(), kind, 3, 2, 1.0, 64, "half", 0.125)
    torch.library.opcheck(ops.dequant_attention, args)


def test_opcheck_dequant_kv_and_round_trip():
    """dequant_kv passes opcheck and decodes what write_kv wrote: close to the input, 4 bits closer than 2."""
    g = torch.Generator().manual_seed(4)
    codec = _codec()
    key, value = torch.randn(2, 2, 16, 64, generator=g) * 2, torch.randn(2, 2, 16, 64, generator=g)
    pos = (torch.arange(16) + 100).expand(2, 2, 16).contiguous()
    errors = []
    for bits in (2, 4):
        store = _storage("e8", cap=16, kb=bits, vb=bits)
        ops.write_kv(*store, key, value, pos, torch.tensor([0, 0]), torch.tensor([16, 16]), *codec, "e8", bits, bits,
                     1.0, 64, "half")
        args = (*store, pos, *codec, "e8", bits, bits, 1.0, 64, "half")
        torch.library.opcheck(ops.dequant_kv, args)
        k_hat, v_hat = ops.dequant_kv(*args)
        assert k_hat.dtype == v_hat.dtype == torch.float32 and k_hat.shape == key.shape
        errors.append(((k_hat - key).pow(2).mean() / key.pow(2).mean(), (v_hat - value).pow(2).mean() / value.pow(2).mean()))
    (k2, v2), (k4, v4) = errors
    assert k4 < 0.02 and v4 < 0.02, f"4-bit relative MSE {k4:.4f} / {v4:.4f}"
    assert k4 < k2 / 6 and v4 < v2 / 6, f"2 bits: {k2:.4f} / {v2:.4f}"


def test_write_then_attend_matches_a_float_reference():
    """Codes written by write_kv, read by dequant_attention == attention over the decoded keys/values."""
    g = torch.Generator().manual_seed(3)
    codec = _codec()
    store = _storage("e8")
    key, value = torch.randn(2, 2, 20, 64, generator=g) * 2, torch.randn(2, 2, 20, 64, generator=g)
    pos = torch.arange(20).expand(2, 2, 20).contiguous()
    count = torch.tensor([20, 13])
    ops.write_kv(*store, key, value, pos, torch.tensor([0, 0]), count, *codec, "e8", 3, 2, 1.0, 64, "half")
    t = KVTransform("e8", 3, 2, 1.0, 64, "half")
    code_pos = torch.arange(32).expand(2, 2, 32)
    k_hat = decode_keys(store[0], store[1], code_pos, codec[0], codec[1], codec[2][0], codec[3][0], t)
    v_hat = decode_values(store[2], store[3], codec[0], codec[2][1], codec[3][1], t)
    # Round trip is close to the input (3-bit keys, 2-bit values).
    k_err = (k_hat[0, :, :20] - key[0]).pow(2).mean() / key[0].pow(2).mean()
    assert k_err < 0.05, f"key relative MSE {k_err:.3f}"
    v_err = (v_hat[0, :, :20] - value[0]).pow(2).mean() / value[0].pow(2).mean()
    assert v_err < 0.15, f"value relative MSE {v_err:.3f}"
    q = torch.randn(2, 4, 1, 64, generator=g)
    ek = torch.zeros(2, 2, 1, 64)
    out = ops.dequant_attention(q, *store, code_pos, count, ek, ek, torch.zeros(2, 1, 1, dtype=torch.bool), *codec,
                                "e8", 3, 2, 1.0, 64, "half", 0.125)
    for b in range(2):
        n = int(count[b])
        kk = k_hat[b, :, :n].repeat_interleave(2, 0)
        vv = v_hat[b, :, :n].repeat_interleave(2, 0)
        ref = torch.softmax(q[b] @ kk.transpose(-1, -2) * 0.125, -1) @ vv
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=1e-5, msg=f"sequence {b}")
