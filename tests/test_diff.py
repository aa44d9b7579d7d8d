"""The graph-diff tool: per captured graph every attention and cache site with what became of it, graph breaks and
recompiles, text / HTML / JSON renderings, the structured-trace artifact, and ``nqcompile diff``."""

import json
import logging

import pytest
from torch._logging._internal import trace_log

import nqcompile
from nqcompile.compile import CompileReport, GraphDiff, LeftAlone, Rewrite, Site, graph_diff
from nqcompile.compile.diff import ARTIFACT_NAME, site_outcomes
from tiny_models import save_tiny_model_with_tokenizer, tiny_model

# Small enough for the tiny models' 40-token prompts to evict and flush (see test_compile_decode.py).
SMALL = dict(recent_window=16, warm_tokens=32, min_evict_tokens=32, relax_key_kl=0, keep_line_breaks=False)
STATUSES = {"rewritten", "fused", "left alone"}


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _check_structure(diff: GraphDiff, layers: int, attention_kind: str, tmp_path):
    """Every graph: each attention layer is a site, every site has an outcome; the renderings hold every graph."""
    assert diff.reports and len(diff.reports) == diff.unique_graphs
    for report in diff.reports:
        assert report.counts[attention_kind] == layers
        outcomes = site_outcomes(report)
        assert [o.node for o in outcomes][: len(report.sites)] == [s.node for s in report.sites]
        for o in outcomes:
            assert o.status in STATUSES
            assert o.rewrites if o.status != "left alone" else o.reason
    data = diff.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert [g["graph"] for g in data["graphs"]] == [r.graph for r in diff.reports]
    text = diff.to_text()
    assert all(f"graph {r.graph} (" in text for r in diff.reports)
    page = diff.to_html(tmp_path / "diff.html").read_text()
    assert page.count('<table class="sites">') == len(diff.reports)
    assert page.count('<table class="diff"') == len(diff.reports)
    for r in diff.reports:
        assert f"graph {r.graph} before the passes" in page and f"graph {r.graph} after the passes" in page
    assert page.count("def&nbsp;forward(") == 2 * len(diff.reports)  # both code versions of every graph


def test_unprepared_model_given_a_preset_is_prepared_and_every_attention_site_is_listed(tmp_path):
    model = tiny_model("llama")
    diff = graph_diff(model, nqcompile.get_preset("balanced", **SMALL), prompt_tokens=40, steps=2)
    assert diff.prepared_here and diff.preset == "balanced" and hasattr(model, "nqcompile_preset")
    assert diff.graph_breaks == {} and diff.recompiles == ()
    assert all(r.prepared for r in diff.reports)
    _check_structure(diff, model.config.num_hidden_layers, "dequant_attention", tmp_path)
    with pytest.raises(ValueError, match="prepared with preset 'balanced'"):
        graph_diff(model, "quant_only")


def test_unprepared_model_without_preset_lists_sites_left_alone_naming_optimize(tmp_path):
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match=r"nqcompile\.optimize"):
        diff = graph_diff(model, None, prompt_tokens=20, steps=2)
    assert diff.preset is None and not diff.prepared_here and not hasattr(model, "nqcompile_preset")
    assert not any(r.prepared for r in diff.reports)
    _check_structure(diff, model.config.num_hidden_layers, "sdpa", tmp_path)
    for report in diff.reports:
        assert all(o.status == "left alone" and "nqcompile.optimize" in o.reason for o in site_outcomes(report))
    # A DynamicCache grows by one token a step: Dynamo recompiles, and says which guard failed.
    assert diff.recompiles and all(f.recompile_reason for f in diff.recompiles)
    assert "recompiles:" in diff.to_text()


def test_each_graph_is_emitted_as_a_structured_trace_artifact():
    model = nqcompile.optimize(tiny_model("llama"), "quant_only", **SMALL)
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler, level = Keep(), trace_log.level
    trace_log.addHandler(handler)  # what TORCH_TRACE sets up, minus the files
    trace_log.setLevel(logging.DEBUG)
    try:
        diff = graph_diff(model, prompt_tokens=40, steps=1)
    finally:
        trace_log.removeHandler(handler)
        trace_log.setLevel(level)
    assert not diff.prepared_here and diff.preset == "quant_only"
    ours = [r for r in records if r.metadata.get("artifact", {}).get("name") == ARTIFACT_NAME]
    assert [r.metadata["artifact"]["encoding"] for r in ours] == ["json"] * len(diff.reports)
    assert [json.loads(r.payload)["graph"] for r in ours] == [r.graph for r in diff.reports]
    assert all("frame_id" in r.metadata for r in ours)  # filed under the compile that made the graph


def test_site_outcomes_read_rewrites_fusions_and_reasons_and_render(tmp_path):
    sites = (Site("dequant_attention", "out", "dequant_attention.default"),
             Site("cache_write", "w0", "write_kv.default"), Site("cache_write", "w1", "write_kv.default"),
             Site("sdpa", "attn", "scaled_dot_product_attention"))
    report = CompileReport(
        7, sites, True, None, {"dequant_attention": 1, "cache_write": 2, "sdpa": 1},
        rewrites=(Rewrite("fuse_flush_attention", "out", "nqcompile::cache_attention", ("w0", "view_3")),
                  Rewrite("other_pass", "mystery", "nqcompile::other")),
        left_alone=(LeftAlone("attn", "sdpa", "a sliding-window layer"),),
        pass_counts={"fuse_flush_attention": 1, "other_pass": 1},
        code_before="def forward(self, x):\n    y = f(x)\n    return y\n",
        code_after="def forward(self, x):\n    y = g(x)\n    return y\n")
    got = {o.node: o for o in site_outcomes(report)}
    assert list(got) == ["out", "w0", "w1", "attn", "mystery"]
    assert got["out"].status == "rewritten" and "nqcompile::cache_attention" in got["out"].describe()
    assert "w0, view_3" in got["out"].describe()
    assert got["w0"].status == "fused" and got["w0"].rewrites[0].site == "out"
    assert got["w1"].status == "left alone" and not got["w1"].recorded and got["w1"].reason
    assert got["attn"].recorded and got["attn"].reason == "a sliding-window layer"
    assert got["mystery"].kind == "other" and got["mystery"].status == "rewritten"
    diff = GraphDiff("M", "balanced", False, None, {}, 40, 1, 2, (report,), {"a reason": 2}, (), 1)
    text = diff.to_text()
    assert "fused into out" in text and "a sliding-window layer" in text and "2 x a reason" in text
    page = diff.to_html(tmp_path / "d.html").read_text()
    assert "diff_chg" in page and "nqcompile::cache_attention" in page
    assert json.loads(json.dumps(diff.to_dict())) == diff.to_dict()


def test_cli_diff_prints_every_graph_and_writes_html(tmp_path, capsys):
    from nqcompile.cli import main

    save_tiny_model_with_tokenizer(tmp_path / "tiny")
    html = tmp_path / "out.html"
    argv = ["diff", "--model", str(tmp_path / "tiny"), "--preset", "balanced", "--steps", "2", "--prompt-tokens", "40",
            "--html", str(html)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for needle in ("loading model", "prefill: 1 x 40 tokens", "compiling the decode step", "preset balanced",
                   "dequant_attention", "graph breaks: 0", str(html)):
        assert needle in out, out
    assert html.read_text().count('<table class="sites">') >= 1


def test_cli_diff_reports_a_missing_model_folder(tmp_path, capsys):
    from nqcompile.cli import main

    assert main(["diff", "--model", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_diff_lists_the_30_attention_sites_of_smollm2(tmp_path):
    from nqcompile.models import load_pretrained

    model, tokenizer = load_pretrained()
    diff = graph_diff(model, "balanced", prompt_tokens=64, steps=2, tokenizer=tokenizer)
    _check_structure(diff, 30, "dequant_attention", tmp_path)
    (report,) = diff.reports
    assert report.pass_counts["fuse_flush_attention"] == 30
    rewritten = [o for o in site_outcomes(report) if o.kind == "dequant_attention" and o.status == "rewritten"]
    assert sorted(o.module for o in rewritten) == sorted(f"model.layers.{i}.self_attn" for i in range(30))
    assert all(o.rewrites[-1].became == "nqcompile::cache_attention" for o in rewritten)


def test_layers_the_cache_leaves_to_transformers_run_uncompressed_and_the_diff_says_why(tmp_path):
    """Gemma 3 with compress_layers="global_only": its sliding-window layers keep transformers' cache and SDPA,
    which no pass knows; they are listed as left alone with the reason, the global layers are rewritten."""
    model = nqcompile.optimize(tiny_model("gemma3"), "quant_only", compress_layers="global_only", **SMALL)
    sliding = [i for i, t in enumerate(model.config.layer_types) if t == "sliding_attention"]
    diff = graph_diff(model, prompt_tokens=60, steps=3)
    assert diff.graph_breaks == {}
    for report in diff.reports:
        outcomes = site_outcomes(report)
        sdpa = [o for o in outcomes if o.kind == "sdpa"]
        assert sorted(o.module for o in sdpa) == [f"model.layers.{i}.self_attn" for i in sliding]
        assert all(o.status == "left alone" and o.recorded and "leaves uncompressed" in o.reason for o in sdpa)
        fused = [o for o in outcomes if o.kind == "dequant_attention"]
        assert len(fused) == len(model.config.layer_types) - len(sliding)
        assert all(o.status == "rewritten" for o in fused)
    assert "leaves uncompressed" in diff.to_text()
