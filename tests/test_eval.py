"""Evaluation helpers: windows, the token-by-token NLL protocol, bootstrap intervals, needle haystacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
import torch
from transformers import DynamicCache

from nqcompile.eval import (
    GENRES,
    bootstrap_ci,
    build_needle_case,
    continuation_nll,
    leading_special_ids,
    loglik_change,
    needle_recall,
    perplexity,
    perplexity_windows,
    ppl_change_percent,
    read_data_text,
    run_needle_case,
    window_nll,
    window_token_nll,
)
from nqcompile.eval.needle import NEEDLE, QUESTION, _found
from nqcompile.eval.perplexity import DATA_DIR, tokenize_text
from tiny_models import byte_tokenizer, tiny_model


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    """SmolLM2's tokenizer (its tests are ``slow``: conftest.py marks every test that needs the model)."""
    return smollm2[1]


# --- bootstrap and arithmetic -------------------------------------------------------------------------


def test_bootstrap_ci_constant_sample():
    ci = bootstrap_ci([2.5] * 6)
    assert (ci.mean, ci.low, ci.high, ci.n) == (2.5, 2.5, 2.5, 6)


def test_bootstrap_ci_single_value():
    ci = bootstrap_ci([1.25])
    assert (ci.mean, ci.low, ci.high) == (1.25, 1.25, 1.25)


def test_bootstrap_ci_known_sample_matches_normal_theory():
    rng = np.random.default_rng(123)
    x = rng.normal(10.0, 2.0, size=400)
    ci = bootstrap_ci(x, seed=1)
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert ci.mean == pytest.approx(x.mean())
    assert ci.low == pytest.approx(x.mean() - 1.96 * se, abs=0.25 * se)
    assert ci.high == pytest.approx(x.mean() + 1.96 * se, abs=0.25 * se)


def test_bootstrap_ci_is_seeded_and_ordered():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    a, b = bootstrap_ci(x, seed=7), bootstrap_ci(x, seed=7)
    assert a == b
    assert 1.0 <= a.low < a.mean == 3.0 < a.high <= 5.0
    wide, narrow = bootstrap_ci(x, confidence=0.99), bootstrap_ci(x, confidence=0.5)
    assert wide.low <= narrow.low and narrow.high <= wide.high


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("inf")]])
def test_bootstrap_ci_rejects_bad_samples(bad):
    with pytest.raises(ValueError):
        bootstrap_ci(bad)


def test_bootstrap_ci_rejects_bad_confidence():
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], confidence=1.0)


def test_perplexity_arithmetic():
    assert perplexity(10 * math.log(20.0), 10) == pytest.approx(20.0)
    assert ppl_change_percent(100.0, 100.0, 50) == 0.0
    # 2% worse perplexity <=> NLL per token higher by log(1.02)
    assert ppl_change_percent(50 * math.log(1.02), 0.0, 50) == pytest.approx(2.0)
    assert loglik_change(50 * math.log(1.02), 0.0, 50) == pytest.approx(-math.log(1.02))


@given(st.floats(0.0, 1e5), st.floats(0.0, 1e5), st.integers(1, 10_000))
def test_loglik_change_is_the_log_of_the_perplexity_ratio(nll, base, n):
    change = loglik_change(nll, base, n)
    assert change == pytest.approx((base - nll) / n)
    if abs(change) < 50:
        assert ppl_change_percent(nll, base, n) == pytest.approx(100 * math.expm1(-change), rel=1e-9, abs=1e-9)


# --- windows ----------------------------------------------------------------------------------------------


def test_vendored_texts_are_there():
    for name in ("persuasion.txt", "northanger_abbey.txt"):
        assert len(read_data_text(name)) > 400_000
    assert len(read_data_text("prompt.txt")) > 6_000  # the demo prompt: 1,822 SmolLM2 tokens
    with pytest.raises(FileNotFoundError):
        read_data_text("nope.txt")


def test_every_genre_file_is_vendored_with_its_licence_noted():
    notes = (DATA_DIR / "README.md").read_text()
    assert set(GENRES) == {"prose", "technical", "code"}
    for name in [f for files in GENRES.values() for f in files] + ["prompt.txt", "LICENSE-PSF.txt"]:
        assert len(read_data_text(name)) > 10_000 or name == "prompt.txt"
        assert f"| `{name}` |" in notes, name
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in read_data_text("LICENSE-PSF.txt")
    assert read_data_text("argparse.py.txt").count("class ArgumentParser(") == 1  # the module, unchanged
    assert "Special method names" in read_data_text("python_reference.txt")


def test_leading_special_ids():
    assert leading_special_ids(byte_tokenizer()) == []
    assert leading_special_ids(byte_tokenizer(bos=True)) == [256]


@pytest.mark.parametrize("bos", [False, True])
def test_windows_start_with_the_leading_special_tokens_then_cut_the_text(bos):
    tokenizer = byte_tokenizer(bos=bos)
    text = tokenize_text(tokenizer, read_data_text("argparse.py.txt"))
    windows = perplexity_windows(tokenizer, n_windows=3, prefix=100, continuation=20, seed=5, sources=GENRES["code"])
    lead = [256] if bos else []
    span = 120 - len(lead)  # the lead counts in the prefix
    for w in windows:
        assert w.source == "argparse.py.txt" and w.input_ids.shape == (1, 120) and w.continuation == 20
        assert w.start % span == 0
        assert w.input_ids[0].tolist() == lead + text[w.start : w.start + span]
    with pytest.raises(ValueError, match="hold only"):
        perplexity_windows(tokenizer, n_windows=len(text) // span + 1, prefix=100, continuation=20,
                           sources=GENRES["code"])


def test_windows_are_deterministic(tokenizer):
    a = perplexity_windows(tokenizer, n_windows=8, seed=0)
    b = perplexity_windows(tokenizer, n_windows=8, seed=0)
    c = perplexity_windows(tokenizer, n_windows=8, seed=1)
    assert [(w.source, w.start) for w in a] == [(w.source, w.start) for w in b]
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    assert [(w.source, w.start) for w in a] != [(w.source, w.start) for w in c]
    for w in a:
        assert w.input_ids.shape == (1, 3584 + 512) and w.input_ids.dtype == torch.long
        assert (w.prefix, w.continuation) == (3584, 512)
    spans = sorted((w.source, w.start) for w in a)
    for (s1, a1), (s2, a2) in zip(spans, spans[1:]):
        assert s1 != s2 or a2 - a1 >= 4096  # no overlap


@pytest.mark.parametrize("genre, windows", [("technical", 6), ("code", 5)])
def test_smollm2_windows_per_genre_as_the_data_notes_say(tokenizer, genre, windows):
    """``nqcompile/data/README.md``: 6 and 5 non-overlapping windows of 3,584 + 512 tokens (SmolLM2's tokenizer)."""
    assert len(perplexity_windows(tokenizer, n_windows=windows, sources=GENRES[genre])) == windows
    with pytest.raises(ValueError, match="hold only"):
        perplexity_windows(tokenizer, n_windows=windows + 1, sources=GENRES[genre])


@pytest.mark.parametrize("genre, windows", [("technical", 6), ("code", 5)])
def test_gemma3_windows_per_genre_as_the_data_notes_say(gemma3, genre, windows):
    tokenizer = gemma3[1]
    got = perplexity_windows(tokenizer, n_windows=windows, sources=GENRES[genre])
    assert all(w.input_ids[0, 0] == tokenizer.bos_token_id for w in got)
    with pytest.raises(ValueError, match="hold only"):
        perplexity_windows(tokenizer, n_windows=windows + 1, sources=GENRES[genre])


def test_windows_reject_impossible_requests(tokenizer):
    with pytest.raises(ValueError):
        perplexity_windows(tokenizer, n_windows=1000)
    with pytest.raises(ValueError):
        perplexity_windows(tokenizer, n_windows=2, prefix=0)


# --- the NLL protocol ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_window_nll_token_by_token_matches_one_forward_pass(smollm2):
    model, tokenizer = smollm2
    (w,) = perplexity_windows(tokenizer, n_windows=1, prefix=40, continuation=12, seed=3)
    timings = {}
    nll, n = window_nll(model, w.input_ids, w.prefix, DynamicCache(), timings=timings)
    assert n == 12
    assert timings["decode_steps"] == 11 and timings["prefill_s"] > 0 and timings["decode_s"] > 0
    with torch.inference_mode():
        logits = model(w.input_ids).logits[0, w.prefix - 1 : -1]
    ref = torch.nn.functional.cross_entropy(logits, w.input_ids[0, w.prefix :], reduction="sum").item()
    assert nll == pytest.approx(ref, rel=1e-4)


def test_continuation_nll_through_a_prefilled_cache_matches_window_nll():
    """The context but its last token prefilled, then that token and the continuation as decode steps: the same
    NLL as window_nll's prefill of the whole context with an exact cache; a NexusCache replays the same steps."""
    import nqcompile

    model = tiny_model("llama")
    ids = torch.randint(1, 256, (1, 120), generator=torch.Generator().manual_seed(0))
    want, n = window_nll(model, ids, 100, DynamicCache())
    cache = DynamicCache()
    with torch.inference_mode():
        model(ids[:, :99], past_key_values=cache)
    got, m = continuation_nll(model, ids[:, 99:], cache)
    assert m == n == 20 and got == pytest.approx(want, rel=1e-5)
    assert cache.get_seq_length() == 119  # the cache now holds the continuation too

    nqcompile.optimize(model, "quant_only")
    cache = nqcompile.NexusCache(model.config, "quant_only", max_cache_len=120)
    with torch.inference_mode():
        model(ids[:, :99], past_key_values=cache)
    compressed, _ = continuation_nll(model, ids[:, 99:], cache)
    assert compressed != got and abs(compressed - got) / got < 0.05
    with pytest.raises(ValueError, match="at least 2 tokens"):
        continuation_nll(model, ids[:, :1], DynamicCache())


def test_window_token_nll_is_the_full_forward_per_token_and_sums_to_window_nll():
    """Per token: the cross-entropy of one full forward over the window (float64 reference), column j scoring token
    prefix + j; its sum is window_nll's; a batch of two gives one row per sequence."""
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (2, 90), generator=torch.Generator().manual_seed(1))
    per_token = window_token_nll(model, ids, 70, DynamicCache())
    assert per_token.shape == (2, 20) and per_token.dtype == torch.float32
    with torch.inference_mode():
        logits = model(ids).logits[:, 69:-1].double()
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 70:].flatten(), reduction="none").view(2, 20)
    torch.testing.assert_close(per_token.double(), ref, rtol=1e-4, atol=1e-4)
    total, n = window_nll(model, ids, 70, DynamicCache())
    assert n == 40 and total == pytest.approx(float(ref.sum()), rel=1e-5)


def test_window_nll_rejects_bad_prefix(smollm2):
    model, _ = smollm2
    ids = torch.zeros(1, 8, dtype=torch.long)
    for prefix in (0, 8):
        with pytest.raises(ValueError):
            window_nll(model, ids, prefix, DynamicCache())


@pytest.mark.slow
def test_smollm2_perplexity_on_512_token_austen_windows_is_sane(smollm2):
    # Single windows of this Q4_1 model range from about 21 to 46 (measured); over these 8 it is about 34.
    model, tokenizer = smollm2
    losses = []
    for w in perplexity_windows(tokenizer, n_windows=8, prefix=1, continuation=511, seed=0):
        with torch.inference_mode():
            losses.append(model(w.input_ids, labels=w.input_ids).loss.item())
    ppl = math.exp(sum(losses) / len(losses))
    assert 8.0 < ppl < 40.0, ppl


# --- needle ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [512, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_needle_lands_at_the_requested_depth(tokenizer, length, depth):
    case = build_needle_case(tokenizer, length=length, depth=depth, number=4829163, source="northanger_abbey.txt", start=5000)
    ctx = case.context_ids[0]
    assert abs(ctx.shape[0] - length) <= 2
    h0, h1 = case.haystack_span
    n0, n1 = case.needle_span
    assert h0 <= n0 < n1 <= h1 <= ctx.shape[0]
    assert tokenizer.decode(ctx[n0:n1]).strip() == NEEDLE.format(number=4829163)
    # token position check: tokens of haystack before the needle / haystack tokens without it
    assert abs(case.actual_depth - depth) <= 0.03, case.actual_depth
    expected = h0 + depth * ((h1 - h0) - (n1 - n0))
    assert abs(n0 - expected) <= 0.03 * length
    if depth == 0.0:
        assert n0 == h0
    if depth == 1.0:
        assert n1 == h1


def test_needle_chunks_split_one_chat_string(tokenizer):
    case = build_needle_case(tokenizer, length=512, depth=0.5, number=1234567, source="persuasion.txt", start=300)
    full = torch.cat([case.context_ids, case.question_ids], dim=1)[0].tolist()
    text = tokenizer.decode(full)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == full
    question = tokenizer.decode(case.question_ids[0])
    assert question.startswith(QUESTION)
    assert "<|im_start|>assistant" in question
    assert "1234567" not in question and "1234567" in tokenizer.decode(case.context_ids[0])
    assert tokenizer.decode(case.context_ids[0]).startswith("<|im_start|>system")


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_context_starts_with_the_leading_special_tokens_without_a_chat_template(depth):
    """A tokenizer that puts <bos> before a text and has no chat template (Gemma 3 270M, a base model): the context
    chunk starts with <bos>, keeps its length, and the spans still point at the needle and the haystack."""
    tokenizer = byte_tokenizer(bos=True)
    case = build_needle_case(tokenizer, length=600, depth=depth, number=4829163, source="persuasion.txt", start=900)
    ctx = case.context_ids[0].tolist()
    assert ctx[0] == 256 and 256 not in ctx[1:] + case.question_ids[0].tolist() and abs(len(ctx) - 600) <= 2
    n0, n1 = case.needle_span
    assert tokenizer.decode(ctx[n0:n1]) == NEEDLE.format(number=4829163)
    assert case.haystack_span[0] == 1 and abs(case.actual_depth - depth) <= 0.03
    assert tokenizer.decode(case.question_ids[0]).startswith(QUESTION)
    # with a chat template that writes <bos> itself, it is not doubled
    templated = byte_tokenizer(bos=True, chat_template="<bos>{{ messages[0]['content'] }}\n")
    ctx = build_needle_case(templated, length=600, depth=depth, number=4829163, start=900).context_ids[0].tolist()
    assert ctx[0] == 256 and ctx[1] != 256


def test_needle_rejects_bad_arguments(tokenizer):
    with pytest.raises(ValueError):
        build_needle_case(tokenizer, length=512, depth=1.5, number=1234567)
    with pytest.raises(ValueError):
        build_needle_case(tokenizer, length=512, depth=0.5, number=123456)
    with pytest.raises(ValueError):
        build_needle_case(tokenizer, length=40, depth=0.5, number=1234567)


def test_found_ignores_digit_separators():
    assert _found("4829163", " 4829163.")
    assert _found("4829163", "4,829,163")
    assert _found("4829163", "4 8 2 9 1 6 3")
    assert not _found("4829163", "482916")
    assert not _found("4829163", "4829 164")


@pytest.mark.slow
def test_needle_found_with_the_exact_cache(smollm2):
    model, tokenizer = smollm2
    case = build_needle_case(tokenizer, length=512, depth=0.5, number=7305918, source="persuasion.txt", start=2000)
    out = run_needle_case(model, tokenizer, case, DynamicCache())
    assert _found("7305918", out), out


@pytest.mark.slow
def test_needle_recall_draws_the_same_cases_for_every_cache(smollm2):
    model, tokenizer = smollm2
    sizes = []

    def factory(n):
        sizes.append(n)
        return DynamicCache()

    a = needle_recall(model, tokenizer, factory, lengths=(256,), depths=(0.0, 1.0), progress=False)
    b = needle_recall(model, tokenizer, lambda n: DynamicCache(), lengths=(256,), depths=(0.0, 1.0), progress=False)
    assert [t.needle for t in a.trials] == [t.needle for t in b.trials]
    assert [t.output for t in a.trials] == [t.output for t in b.trials]
    assert len(a.trials) == 2 and all(256 < s < 256 + 64 for s in sizes)
    assert set(a.by_length()) == {256} and 0.0 <= a.recall() <= 1.0
    assert a.to_dict()["trials"][0]["length"] == 256


# --- command line ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_generate_runs_end_to_end(tmp_path, capsys):
    from nqcompile.cli import main

    prompt = tmp_path / "prompt.txt"
    prompt.write_text(read_data_text("prompt.txt")[:600])
    # no subcommand: generate is the default
    assert main(["--prompt-file", str(prompt), "--max-new-tokens", "3", "--held-tokens", "4", "--preset", "balanced"]) == 0
    out = capsys.readouterr().out
    for needle in ("--- continuation (3 tokens", "--- KV cache", "ratio", "generate 3 tokens in", "4 held-out tokens",
                   "compressed (balanced)"):
        assert needle in out, out
