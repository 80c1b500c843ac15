"""token-reduce: the reduction maths, sizes, static shapes, export, option errors, skips, and accuracy on the digits ViT.

The digits ViT (:mod:`tests.models.digits_vit`, 17 tokens, 2 layers, trained in-process with a
fixed seed) is the accuracy check: test-set top-1 measured before and after at 40% fewer FLOPs, no
training. The DeiT-style 66-token model's figures are in ``tools/bench_token_reduce.py`` (its training
takes minutes).
"""

import pytest
import torch

import ptool
from ptool.errors import PassError
from ptool.passes.registry import parse_pass
from ptool.passes.tokens.transform import METHODS, TokenGather, TokenReducer, TokenUnmerge
from tests.models import digits_vit as dv
from tests.models import zoo

BATCH = 64


def _accuracy(model, x, y) -> float:
    """Top-1 over every test image in batches of the traced size (the last one padded)."""
    return dv.accuracy(model, x, y, BATCH, pad=True)


# -- the modules ---------------------------------------------------------------------------------


def _tokens(b=3, n=11, d=8, seed=0):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", METHODS)
def test_reducer_keeps_the_prefix_and_a_static_count(method):
    x = _tokens()
    out, w, kept, size = TokenReducer(prefix=1, keep_count=6, method=method)(x)
    assert out.shape == (3, 7, 8) and w.shape == (3, 10, 6) and kept.shape == (3, 7) and size.shape == (3, 7)
    assert torch.equal(out[:, 0], x[:, 0])  # the CLS token is kept apart, unchanged
    assert torch.equal(kept[:, 0], torch.zeros(3, dtype=torch.long))
    assert torch.allclose(w.sum(-1), torch.ones(3, 10), atol=1e-6)  # un-merging rows are convex combinations
    assert all(len(set(row.tolist())) == 7 for row in kept)  # every output token at a distinct position


@pytest.mark.parametrize("method", ["merge", "fuse", "bipartite"])
def test_sizes_count_the_members_and_weight_the_means(method):
    """One-hot methods: each output token's size is the sum of its members' sizes, exactly, and with
    ``weighted`` its value is their size-weighted mean (fuse: also weighted by the importance)."""
    x = _tokens(b=2)
    size_in = torch.randint(1, 4, (2, 11)).float()
    size_in[:, 0] = 1
    out, w, kept, size = TokenReducer(prefix=1, keep_count=5, method=method, weighted=True)(x, size=size_in)
    assert torch.equal(size[:, 0], size_in[:, 0])
    assert set(w.unique().tolist()) <= {0.0, 1.0}
    members = w.transpose(1, 2)  # (B, Mp, Np)
    assert torch.equal(size[:, 1:], (members * size_in[:, None, 1:]).sum(-1))  # integer counts, exact
    assert size[:, 1:].sum(-1).tolist() == size_in[:, 1:].sum(-1).tolist()  # no token lost or counted twice
    if method != "fuse":
        mean = (members * size_in[:, None, 1:]) @ x[:, 1:] / size[:, 1:, None]
        assert torch.allclose(out[:, 1:], mean, atol=1e-5)
    plain, _, _, plain_size = TokenReducer(prefix=1, keep_count=5, method=method)(x)
    assert torch.equal(plain_size[:, 1:], w.sum(1))  # without sizes in: ones, so the counts of members


def test_prune_keeps_the_anchors_sizes():
    x = _tokens(b=1)
    size_in = torch.arange(1, 12).float().unsqueeze(0)
    _, _, kept, size = TokenReducer(prefix=1, keep_count=4, method="prune")(x, size=size_in)
    assert torch.equal(size[0], size_in[0, kept[0]])


def test_bipartite_matches_a_reference_tome_matching():
    """Alternate tokens A / B; the r A tokens with the most similar B partner merge into it (ToMe)."""
    x = _tokens(b=2, n=13)
    r, np_ = 4, 12
    out, w, kept, size = TokenReducer(prefix=1, keep_count=np_ - r, method="bipartite")(x)
    for i in range(2):
        f = torch.nn.functional.normalize(x[i, 1:], dim=-1)
        best, match = (f[0::2] @ f[1::2].T).max(-1)
        merged = set(best.argsort(descending=True)[:r].tolist())
        col = w[i].argmax(-1)  # each token's output column
        for a in range(6):  # A token a is token 2a; B token j is token 2j + 1
            if a in merged:
                assert col[2 * a] == col[2 * match[a] + 1]  # it joins its partner
            else:
                assert (col == col[2 * a]).sum() == 1 and kept[i, 1 + col[2 * a]] == 1 + 2 * a  # alone, in place
        for c in range(np_ - r):  # every output token is the mean of its members and counts them
            members = col == c
            assert torch.allclose(out[i, 1 + c], x[i, 1:][members].mean(0), atol=1e-6)
            assert size[i, 1 + c] == members.sum()


def test_fuse_keeps_the_anchors_and_fuses_the_rest_by_attention():
    x = _tokens(b=1, n=9)
    q, k = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4)
    out, w, kept, size = TokenReducer(prefix=1, keep_count=4, method="fuse")(x, q, k)
    attn = (q[0, :, :1] @ k[0].transpose(-1, -2) * 1.0).softmax(-1).mean(0)[0, 1:]
    top = attn.topk(3).indices
    assert torch.equal(kept[0, 1:4], top + 1) and torch.equal(out[0, 1:4], x[0, 1 + top])
    rest = torch.ones(8, dtype=torch.bool)
    rest[top] = False
    fused = (attn[rest, None] * x[0, 1:][rest]).sum(0) / attn[rest].sum()
    assert torch.allclose(out[0, 4], fused, atol=1e-5) and size[0, 4] == 5


def test_prune_keeps_the_most_important_tokens_exactly():
    x = _tokens()
    out, _, kept, _ = TokenReducer(prefix=1, keep_count=4, method="prune")(x)
    norms = x[:, 1:].norm(dim=-1)
    top = norms.topk(4, dim=-1).indices + 1
    assert torch.equal(kept[:, 1:], top)
    assert torch.equal(out[:, 1:], x.gather(1, top.unsqueeze(-1).expand(3, 4, 8)))


def test_merge_averages_each_token_into_its_most_similar_anchor():
    x = _tokens(b=1)
    out, w, kept, _ = TokenReducer(prefix=1, keep_count=3, method="merge")(x)
    assign = w[0].argmax(-1)  # anchor of each of the 10 tokens
    for a in range(3):
        members = x[0, 1:][assign == a]
        assert torch.allclose(out[0, 1 + a], members.mean(0), atol=1e-6)
        assert kept[0, 1 + a] - 1 in torch.nonzero(assign == a).flatten()  # an anchor belongs to itself


def test_transform_is_many_to_many_and_tends_to_merge_as_the_temperature_falls():
    x = _tokens()
    soft, w, _, _ = TokenReducer(prefix=1, keep_count=4, method="transform", temperature=1.0)(x)
    assert (w > 1e-3).sum(-1).float().mean() > 2  # tokens spread over several anchors
    cold, _, _, _ = TokenReducer(prefix=1, keep_count=4, method="transform", temperature=1e-4)(x)
    merged, _, _, _ = TokenReducer(prefix=1, keep_count=4, method="merge")(x)
    assert torch.allclose(cold, merged, atol=1e-5) and not torch.allclose(soft, merged, atol=1e-2)


def test_cls_attention_importance_and_masked_keys():
    x = _tokens(b=2, n=7)
    q, k = torch.randn(2, 2, 7, 4), torch.randn(2, 2, 7, 4)
    mask = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    mask[1, ..., 4:] = False  # row 1: the last three keys are padding
    _, _, kept, _ = TokenReducer(prefix=1, keep_count=3, method="merge", scale=0.5)(x, q, k, mask)
    assert (kept[1] < 4).all()  # padding is never an anchor
    scores = ((q[0, :, :1] @ k[0].transpose(-1, -2)) * 0.5).softmax(-1).mean(0)[0, 1:]
    assert torch.equal(kept[0, 1:], scores.topk(3).indices + 1)


def test_gather_and_unmerge():
    mask = torch.arange(2 * 5 * 5).reshape(2, 1, 5, 5)
    kept = torch.tensor([[0, 3, 1], [0, 2, 4]])
    g = TokenGather((2, 3))(mask, kept)
    assert g.shape == (2, 1, 3, 3) and g[1, 0, 2, 1] == mask[1, 0, 4, 2]
    x = torch.randn(2, 3, 4)
    w = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]).expand(2, 3, 2)
    full = TokenUnmerge(1)(x, w)
    assert full.shape == (2, 4, 4) and torch.equal(full[:, 0], x[:, 0])
    assert torch.allclose(full[:, 2], (x[:, 1] + x[:, 2]) / 2)


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, words", [
    ("token-reduce:keep=1.5", ["keep", "(0, 1)"]),
    ("token-reduce:keep=0", ["keep"]),
    ("token-reduce:temperature=0", ["temperature", "> 0"]),
    ("token-reduce:prefix=-2", ["prefix", "-1"]),
    ("token-reduce:layers=-1", ["layers"]),
    ("token-reduce:method=mean", ["method", "transform", "merge", "prune"]),
    ("token-reduce:importance=random", ["importance", "cls-attention", "norm"]),
    ("token-reduce:method=tome", ["method", "bipartite", "fuse"]),
    ("token-reduce:where=attention", ["where", "mlp", "block"]),
    ("token-reduce:schedule=linear", ["schedule", "geometric", "constant"]),
    ("token-reduce:similarity=values", ["similarity", "hidden", "keys"]),
    ("token-reduce:proportional=maybe", ["proportional"]),
    ("token-reduce:keeps=0.5", ["keeps", "keep"]),
])
def test_option_errors_are_one_line_and_name_the_option(spec, words):
    with pytest.raises(PassError) as err:
        parse_pass(spec)
    msg = str(err.value)
    assert "\n" not in msg and "token-reduce" in msg and all(w in msg for w in words), msg


def test_spec_round_trips():
    p = parse_pass("token-reduce:keep=0.5,layers=1+2,method=bipartite,temperature=0.05,where=block,"
                   "proportional=false,schedule=constant,similarity=keys")
    assert p.layers == (1, 2) and not p.proportional and parse_pass(p.spec()) == p


# -- graphs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    with dv.single_thread():
        yield dv.digits_vit(0)


def test_digits_vit_accuracy_without_training(digits):
    """Fixed-seed digits ViT, every test image: the defaults (inside both blocks, after the attention;
    merge with proportional attention) at keep 0.55 remove 40% of the FLOPs and keep top-1 within 1 point."""
    x, y = digits.data.x_test, digits.data.y_test
    with dv.single_thread():
        before = _accuracy(digits.model, x, y)
        m = ptool.transform(dv.digits_vit(0).model, ["token-reduce:keep=0.55"], (x[:BATCH],))
        after = _accuracy(m, x, y)
    row = m.report[0]
    # 16 * 0.55 -> 9 would make 10 tokens, the label count: moved to 8 (9 with the CLS)
    assert row.notes["tokens_per_block"] == "17>9/9>5" and row.notes["prefix_tokens"] == 1
    assert row.notes["proportional_sites"] == 1  # the second block's attention sees the first stage's sizes
    assert row.notes["flops_removed"] >= 0.40, row.notes
    assert row.within_contract and row.fidelity.cosine > 0.98
    assert before - after <= 0.01, (before, after)


def test_digits_vit_reduction_before_the_block_is_kept(digits):
    """``where=block``: the earlier placement - merging before the second block (17 -> 11) within 1 point."""
    x, y = digits.data.x_test, digits.data.y_test
    spec = "token-reduce:keep=0.6,layers=1,where=block,proportional=false"
    with dv.single_thread():
        before = _accuracy(digits.model, x, y)
        m = ptool.transform(dv.digits_vit(0).model, [spec], (x[:BATCH],))
        after = _accuracy(m, x, y)
    row = m.report[0]
    assert row.notes["tokens_per_block"] == "17/11" and 0.15 < row.notes["flops_removed"] < 0.25, row.notes
    assert before - after <= 0.01, (before, after)


def test_the_graph_carries_exact_sizes_into_the_attention(digits):
    """``merge``: each stage's sizes are whole numbers summing to the 16 patches, and the next attention's
    mask is log(size) (ViT's all-true mask, sliced, combined with the bias)."""
    from ptool.ir.record import record_values

    x = digits.data.x_test[:BATCH]
    with dv.single_thread():
        m = ptool.transform(dv.digits_vit(0).model, ["token-reduce:keep=0.5,schedule=constant,method=merge"], (x,))
    gm = m.graph_module
    assert m.report[0].notes["tokens_per_stage"] == "17->9, 9->2"  # constant: 8 removed, then at most 7 left
    reducers = [n for n in gm.graph.nodes if n.op == "call_module" and "token_reduce" in str(n.target)]
    sizes = [next(u for u in r.users if u.args[1] == 3) for r in reducers[:1]]
    sdpa = [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    mask = sdpa[1].args[3] if len(sdpa[1].args) > 3 else sdpa[1].kwargs["attn_mask"]
    got = record_values(gm, [*sizes, mask], [((x,), {})])[0]
    size = got[sizes[0]]
    assert size.shape == (BATCH, 9) and torch.equal(size, size.round()) and (size >= 1).all()
    assert torch.equal(size[:, 0], torch.ones(BATCH)) and (size[:, 1:].sum(-1) == 16).all()
    assert torch.allclose(got[mask].expand(BATCH, 1, 9, 9), size.log()[:, None, None, :].expand(BATCH, 1, 9, 9))


@pytest.mark.parametrize("options", ["", ",method=transform,similarity=keys", ",method=fuse",
                                     ",method=bipartite,similarity=keys", ",where=block,layers=0+1,temperature=0.1"])
def test_static_shapes_export_to_onnx_and_match(digits, tmp_path, options):
    x = digits.data.x_test[:BATCH]
    with dv.single_thread():
        m = ptool.transform(dv.digits_vit(0).model, [f"token-reduce:keep=0.5{options}"], (x,))
        row = m.report[0]
        assert row.rewritten == 2 and row.notes["tokens_per_stage"] == "17->9, 9->5"
        gm = m.graph_module
        shapes = [tuple(n.meta["val"].shape) for n in gm.graph.nodes
                  if isinstance(n.meta.get("val"), torch.Tensor)]
        assert all(isinstance(s, int) for shape in shapes for s in shape)  # no symbolic (data-dependent) sizes
        path = tmp_path / "reduced.onnx"
        ptool.export_onnx(m, path)
        import onnx

        ops = {node.op_type for node in onnx.load(path).graph.node}
        assert "TopK" in ops and "NonZero" not in ops
        ort = ptool.compile(m, backend="onnxruntime")
        ref = m(x).logits
        assert (ort(x).logits - ref).abs().max() < 1e-4


@pytest.mark.slow
def test_tvm_matches_the_transformed_model():
    f = zoo.vit()
    m = ptool.transform(f.model, ["token-reduce:keep=0.5,method=bipartite,layers=0"], f.example_inputs)
    assert m.report[0].rewritten == 1 and m.report[0].notes["proportional_sites"] == 1
    tvm = ptool.compile(m, backend="tvm")
    assert (tvm(*f.example_inputs).logits - m(*f.example_inputs).logits).abs().max() < 1e-4


def test_per_token_outputs_are_unmerged_and_padding_masks_are_gathered():
    """BERT (post-norm) with right padding: last_hidden_state keeps its 16 rows (un-merged), pooled output
    from CLS; the stages sit after each attention's residual norm (15 * 0.8 -> 12, 12 * 0.8 -> 10)."""
    f = zoo.bert()
    m = ptool.transform(f.model, ["token-reduce"], f.example_inputs, example_kwargs=f.example_kwargs)
    row = m.report[0]
    assert row.rewritten == 2 and row.notes["tokens_per_block"] == "16>13/13>11", row.notes
    out = m(*f.example_inputs, **f.example_kwargs)
    assert out.last_hidden_state.shape == (2, 16, 32) and out.pooler_output.shape == (2, 32)
    assert row.fidelity.mismatched_leaves == 0 and row.within_contract
    names = [n.target for n in m.graph_module.graph.nodes if n.op == "call_module"]
    assert any("token_gather" in t for t in names) and any("token_unmerge" in t for t in names)


def test_causal_sites_are_skipped_and_the_graph_is_untouched():
    f = zoo.llama()
    m = ptool.transform(f.model, ["token-reduce"], f.example_inputs, example_kwargs=f.example_kwargs)
    row = m.report[0]
    assert row.rewritten == 0 and row.fidelity.max_abs_error == 0
    assert row.nodes_after == row.nodes_before
    assert all("causal" in s.reason for s in row.skipped)


def test_a_token_count_equal_to_the_width_is_refused_and_rolled_back():
    """17 tokens and a width of 17: which 17s are tokens is ambiguous; the stage is put back."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=17, num_hidden_layers=2,
                       num_attention_heads=1, intermediate_size=34, num_labels=10)
    model = ViTForImageClassification._from_config(config, attn_implementation="sdpa").eval()
    m = ptool.transform(model, ["token-reduce"], (torch.randn(4, 1, 8, 8),))
    row = m.report[0]
    assert row.rewritten == 0 and row.fidelity.max_abs_error == 0 and row.nodes_after == row.nodes_before
    assert len(row.skipped) == 2 and all("17" in s.reason for s in row.skipped), row.skipped  # both blocks


def test_layers_beyond_the_sites_is_a_pass_error():
    f = zoo.vit()
    with pytest.raises(PassError, match="layers=5 but the graph has 2 attention site"):
        ptool.transform(f.model, ["token-reduce:layers=5"], f.example_inputs)
