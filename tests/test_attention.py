"""Sequence models: the causal mask and attention ops, the multihead_attention and
positional_embedding layers, and a small GPT whose forward pass and gradients match PyTorch's (in
float64, to 1e-8) and float64 finite differences."""
from __future__ import annotations

import math

import numpy as np
import pytest

import graphc
from graphc.compiler import check_source
from graphc.errors import GraphcError
from graphc.gradcheck import check_gradients

TINY_GPT = """
def attend(h, d, heads) = h + (h -> layernorm -> multihead_attention(d, heads))
def mlp(h, d) = h + (h -> layernorm -> linear(4 * d) -> gelu -> linear(d))

model tiny_gpt {
    input x: i64[N, 8]
    input y: i64[N, 8]
    param E: f64[11, 16] = normal(std=0.5)
    param P: f64[8, 16] = normal(std=0.5)
    h = embedding(x, E) + P
    h = h -> attend(16, 2) -> mlp(16) -> attend(16, 2) -> layernorm
    output logits = h @ transpose(E)
    loss = cross_entropy(logits, y)
}
"""
rng = np.random.default_rng(20)


def _batch(n=3, t=8, vocab=11):
    return rng.integers(0, vocab, (n, t)), rng.integers(0, vocab, (n, t))


# --- ops and layers ----------------------------------------------------------------------------------

def test_attention_is_softmax_of_scaled_scores_masked_causally():
    src = """model m {
        input q: f64[N, 2, 5, 4]
        input k: f64[N, 2, 5, 4]
        input v: f64[N, 2, 5, 3]
        output a = attention(q, k, v)
        output b = attention(q, k, v, causal=false)
    }"""
    p = graphc.compile_source(src)
    q, k, v = (rng.standard_normal((2, 2, 5, d)) for d in (4, 4, 3))
    out = p.forward(q=q, k=k, v=v)
    s = q @ np.swapaxes(k, -1, -2) / 2.0
    for name, causal in (("a", True), ("b", False)):
        t = np.where(np.tril(np.ones((5, 5), bool)), s, -np.inf) if causal else s
        w = np.exp(t - t.max(-1, keepdims=True))
        np.testing.assert_allclose(out[name], (w / w.sum(-1, keepdims=True)) @ v, rtol=1e-12, atol=1e-12)
    # causal: the first query sees the first key alone
    np.testing.assert_allclose(out["a"][:, :, 0], v[:, :, 0], rtol=1e-12)


def test_causal_mask_runs_on_llvm_inside_the_softmax_kernel():
    src = """model m {
        input s: f32[N, 3, 6, 6]
        output w = softmax(causal_mask(s))
    }"""
    s = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    want = graphc.compile_source(src).forward(s=s)["w"]
    got = graphc.compile_source(src, backend="llvm").forward(s=s)["w"]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert np.all(np.triu(got[0, 0], 1) == 0)


def test_multihead_attention_layer_creates_its_projections():
    checked = check_source("""model m {
        input x: f32[N, 7, 12]
        output o = x -> multihead_attention(12, 3)
        output p = x -> multihead_attention(12, 4, bias=false, causal=false)
    }""", "m.nn")
    ir = checked.pick(None)
    assert sorted(ir.params) == sorted([f"o.{w}{n}" for w in "Wb" for n in "qkvo"]
                                       + [f"p.W{n}" for n in "qkvo"])
    assert all(ir.params[f"o.W{n}"].role == "weight" for n in "qkvo")
    assert ir.outputs["o"].type.shape == ("N", 7, 12)


def test_positional_embedding_is_a_learned_table_added_by_broadcasting():
    p = graphc.compile_source("""model m {
        input x: i64[N, 5]
        output h = embedding(x, 9, 4) + positional_embedding(5, 4)
    }""")
    assert p.params["h.positional_embedding.P"].shape == (5, 4)
    x = rng.integers(0, 9, (2, 5))
    want = p.params["h.embedding.E"][x] + p.params["h.positional_embedding.P"]
    np.testing.assert_allclose(p.forward(x=x)["h"], want, rtol=1e-6)


@pytest.mark.parametrize("body, message", [
    ("output o = x -> multihead_attention(12, 5)", "d_model 12 is not a multiple of heads 5"),
    ("output o = x -> multihead_attention(12, 3, dropout=1.5)", r"dropout must be in \[0, 1\)"),
    ("output o = attention(x, x, x, stream=2)", "attention has no option 'stream'"),
    ("output o = causal_mask(sum(x, axis=[1, 2]))", "causal_mask: needs scores"),
    ("output o = positional_embedding(0, 4)", "T must be at least 1"),
])
def test_attention_mistakes_are_located(body, message):
    with pytest.raises(GraphcError, match=message) as info:
        check_source(f"model m {{\n    input x: f32[N, 7, 12]\n    {body}\n}}\n", "m.nn")
    assert "m.nn:3:" in str(info.value)


def test_attention_dropout_draws_its_own_stream_in_training_only():
    src = """model m {
        input x: f64[N, 6, 8]
        input t: f64[N, 6, 8]
        h = x -> multihead_attention(8, 2, dropout=0.5)
        output h
        loss = mse(h, t)
    }"""
    p = graphc.compile_source(src)
    x, t = rng.standard_normal((2, 6, 8)), rng.standard_normal((2, 6, 8))
    a, _ = p.loss_and_grads(x=x, t=t)
    assert p.loss_and_grads(x=x, t=t)[0] == a             # the same key, the same masks
    p.seed += 1
    b, _ = p.loss_and_grads(x=x, t=t)
    assert a != b                                         # another key, other masks
    np.testing.assert_array_equal(p.forward(x=x)["h"], p.forward(x=x)["h"])


# --- a small GPT against PyTorch and finite differences ---------------------------------------------

def _torch_tiny_gpt(torch, params, x, y):
    """The same network in PyTorch, functional, over graphc's parameters (x @ W convention)."""
    p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    f = torch.nn.functional

    def ln(h, prefix):
        return f.layer_norm(h, (h.shape[-1],), p[f"{prefix}.gamma"], p[f"{prefix}.beta"], 1e-5)

    def attend(h, prefix):
        a = ln(h, f"{prefix}.layernorm")
        n, t, c = a.shape
        q, k, v = ((a @ p[f"{prefix}.multihead_attention.W{s}"] + p[f"{prefix}.multihead_attention.b{s}"])
                   .view(n, t, 2, c // 2).transpose(1, 2) for s in "qkv")
        y = f.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(n, t, c)
        return h + y @ p[f"{prefix}.multihead_attention.Wo"] + p[f"{prefix}.multihead_attention.bo"]

    def mlp(h, prefix):
        a = ln(h, f"{prefix}.layernorm")
        a = f.gelu(a @ p[f"{prefix}.linear.W"] + p[f"{prefix}.linear.b"])
        return h + a @ p[f"{prefix}.linear_2.W"] + p[f"{prefix}.linear_2.b"]

    h = p["E"][torch.tensor(x)] + p["P"]
    h = attend(h, "h_2.attend")
    h = mlp(h, "h_2.mlp")
    h = attend(h, "h_2.attend_2")
    logits = ln(h, "h_2.layernorm") @ p["E"].T
    loss = f.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(y).reshape(-1))
    loss.backward()
    return logits.detach().numpy(), float(loss.detach()), {k: v.grad.numpy() for k, v in p.items()}


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_tiny_gpt_matches_pytorch_in_float64(backend):
    torch = pytest.importorskip("torch", reason="PyTorch is the oracle here: pip install -e '.[test]'")
    program = graphc.compile_source(TINY_GPT, backend=backend)
    x, y = _batch()
    logits, loss, grads = _torch_tiny_gpt(torch, program.params, x, y)
    np.testing.assert_allclose(program.forward(x=x)["logits"], logits, rtol=1e-8, atol=1e-10)
    got_loss, got = program.loss_and_grads(x=x, y=y)
    assert math.isclose(got_loss, loss, rel_tol=1e-10)
    assert set(got) == set(grads)
    for name in grads:
        np.testing.assert_allclose(got[name], grads[name], rtol=1e-8, atol=1e-10, err_msg=name)


def test_tiny_gpt_gradients_match_finite_differences():
    _, results = check_gradients(check_source(TINY_GPT, "tiny_gpt.nn"), samples=8)
    bad = [r for r in results if not r.ok]
    assert not bad, bad
    assert len(results) == 30          # every parameter checked


def test_generation_window_padding_never_reaches_the_logits_read():
    """graphc sample pads a short history at the end of the window: causal attention keeps the
    positions read from seeing it."""
    program = graphc.compile_source(TINY_GPT)
    x = rng.integers(0, 11, (1, 8))
    other = x.copy()
    other[0, 5:] = rng.integers(0, 11, 3)
    a, b = (program.forward(x=v)["logits"] for v in (x, other))
    np.testing.assert_array_equal(a[0, :5], b[0, :5])
    assert not np.allclose(a[0, 5:], b[0, 5:])
