"""options={"simulate": ...}: an unprepared model's attention reads its keys and values through
nqcompile::simulate_qdq (a quality study, labelled as such), the same as a cache that hands the attention
quantize-dequantized tensors; and the op's round trip (shape, dtype, empty slots, error shrinking with bits)."""

import hypothesis.strategies as st
import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from transformers import DynamicCache, StaticCache

import nqcompile
from nqcompile.compile import report as nexus_report
from nqcompile.compile.passes.simulate import simulate_kv, simulation_preset
from nqcompile.models import cache_kwarg_name
from nqcompile.ops.simulate import simulate_qdq
from tiny_models import tiny_model

LENGTH = 100


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class _HandSimulatedCache(DynamicCache):
    """A DynamicCache that hands the attention its keys and values through simulate_qdq (the reference)."""

    def __init__(self, key_bits: int, value_bits: int):
        super().__init__()
        self.bits = key_bits, value_bits

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        # quant_only codes keys with key_norm="mean" and values with value_norm="none"
        return simulate_qdq(keys, self.bits[0], "mean", "e8"), simulate_qdq(values, self.bits[1], "none", "e8")


def _ids():
    return torch.randint(1, 256, (1, LENGTH), generator=torch.Generator().manual_seed(0))


def _logits(model, cache, fn=None):
    with torch.no_grad():
        return (model if fn is None else fn)(_ids(), **{cache_kwarg_name(model): cache}).logits


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _simulating_backend(options, rewrites):
    """A Dynamo backend that runs simulate_kv on the graph and then the graph as it is (no Inductor)."""
    def backend(gm, example_inputs):
        rewrites.extend(simulate_kv(gm, options))
        return gm.forward
    return backend


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_pass_gives_the_attention_the_op_applied_by_hand(attention):
    model = tiny_model("llama", attention=attention)
    want = _logits(model, _HandSimulatedCache(4, 2))
    rewrites = []
    backend = _simulating_backend({"simulate": True}, rewrites)
    got = _logits(model, DynamicCache(), torch.compile(model, backend=backend, fullgraph=True))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(rewrites) == model.config.num_hidden_layers
    assert _relative(got, _logits(model, DynamicCache())) > 1e-3


def test_empty_slots_of_a_static_cache_stay_out_of_the_statistics():
    """A StaticCache hands the attention its whole buffer, zeros past the prompt: the op codes what the prompt
    filled (after this step's index_copy_) as a cache holding only the prompt would."""
    model = tiny_model("llama")
    static = StaticCache(config=model.config, max_cache_len=LENGTH + 28)
    got = _logits(model, static, torch.compile(model, backend=_simulating_backend({"simulate": True}, []),
                                               fullgraph=True))
    torch.testing.assert_close(got, _logits(model, _HandSimulatedCache(4, 2)), atol=1e-5, rtol=1e-5)


def test_more_bits_simulate_closer_to_the_uncompressed_model():
    model = tiny_model("qwen2")
    exact = _logits(model, DynamicCache())
    errors = []
    for preset in ("max", "asym", "high"):  # 2 + 2, 3 + 2, 4 + 3 bits for keys + values
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=_simulating_backend({"simulate": preset}, []), fullgraph=True)
        errors.append(_relative(_logits(model, DynamicCache(), compiled), exact))
    assert errors[0] > errors[1] > errors[2] > 1e-3, errors


def test_simulate_option_compiles_an_unprepared_model_and_reports_a_simulation():
    model = tiny_model("llama")
    options = {"simulate": True}
    with pytest.warns(UserWarning, match=r"quantize-dequantize.*no memory is saved.*nqcompile\.optimize"):
        got = _logits(model, DynamicCache(), torch.compile(model, backend="nexusquant", options=options))
    assert options == {"simulate": True}  # the caller's options are left as they were
    want = _logits(model, _HandSimulatedCache(4, 2))
    exact = _logits(model, DynamicCache())
    # Inductor's kernels round differently from eager, which can move a few lattice decisions
    assert _relative(got, want) < 0.05 * _relative(got, exact)
    assert 1e-3 < _relative(got, exact) < 1.0
    (report,) = nexus_report.last_reports()
    layers = model.config.num_hidden_layers
    assert report.simulated and not report.prepared and report.pass_counts == {"simulate": layers}
    sdpa = [site.node for site in report.sites if site.kind == "sdpa"]
    assert [r.site for r in report.rewrites] == sdpa and len(sdpa) == layers
    assert {r.became for r in report.rewrites} == {"nqcompile::simulate_qdq"}
    assert "simulate_qdq" in report.code_after and "simulate_qdq" not in report.code_before
    assert "simulated" in str(report)


def test_simulate_on_a_prepared_model_is_refused():
    model = nqcompile.optimize(tiny_model("llama"), "quant_only", recent_window=16, relax_key_kl=0)
    cache = nqcompile.NexusCache(model.config, model.nqcompile_preset, max_cache_len=LENGTH + 1)
    kw = {cache_kwarg_name(model): cache}
    step = torch.compile(model.forward, backend=_simulating_backend({"simulate": True}, []), fullgraph=True)
    with torch.no_grad():
        model(_ids(), **kw)
        with pytest.raises(Exception, match="not prepared"):
            step(_ids()[:, :1], **kw)


def test_simulation_preset_options():
    assert simulation_preset({"simulate": True}).name == "quant_only"
    assert simulation_preset({"simulate": True, "preset": "asym"}).key_bits == 3
    assert simulation_preset({"simulate": nqcompile.get_preset("max")}).key_bits == 2
    with pytest.raises(ValueError, match="two presets"):
        simulation_preset({"simulate": "asym", "preset": "max"})
    with pytest.raises(ValueError, match="exactly"):
        simulation_preset({"simulate": True, "preset": nqcompile.get_preset("asym", key_bits=None,
                                                                             value_bits=None)})
    with pytest.raises(TypeError, match="simulate"):
        simulation_preset({"simulate": 4})


@settings(max_examples=25, deadline=None)
@given(heads=st.integers(1, 3), tokens=st.integers(8, 40), dim=st.sampled_from([8, 16, 64]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), empty=st.integers(0, 4),
       norm=st.sampled_from(["per_channel", "mean", "none"]), seed=st.integers(0, 2**16))
def test_simulate_qdq_round_trip(heads, tokens, dim, dtype, empty, norm, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, heads, tokens, dim, generator=gen) * 3 + torch.randn(dim, generator=gen)).to(dtype)
    x[:, :, tokens - empty:] = 0  # empty slots of a preallocated cache
    errors = []
    for bits in (2, 3, 4):
        y = torch.ops.nqcompile.simulate_qdq(x, bits, norm, "e8")
        assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
        assert torch.equal(y[:, :, tokens - empty:], x[:, :, tokens - empty:])
        errors.append(float((y.double() - x.double()).square().sum() / x.double().square().sum()))
    assert errors[0] > errors[1] > errors[2] > 0


def test_simulate_qdq_fake_and_errors():
    x = torch.randn(1, 2, 16, 5).transpose(2, 3)  # a non-contiguous [1, 2, 5, 16] view
    torch.library.opcheck(torch.ops.nqcompile.simulate_qdq.default, (x, 4, "mean", "e8"))
    with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
        simulate_qdq(x[0], 4, "mean", "e8")
    with pytest.raises(ValueError, match="per_pair"):
        simulate_qdq(x, 4, "per_pair", "e8")
    with pytest.raises(ValueError, match="offers bits"):
        simulate_qdq(x, 5, "mean", "e8")
