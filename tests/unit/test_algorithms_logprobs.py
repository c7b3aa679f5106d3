"""Chunked log-prob / entropy against the naive full-vocab computation, and gradcheck."""

import pytest
import torch

from moe_rl.train.logprobs import token_logprobs_and_entropy


def naive(h, w, t, temperature=1.0, vocab_size=None):
    if vocab_size is not None:
        w = w[:vocab_size]
    logits = (h @ w.t()) / temperature
    ls = torch.log_softmax(logits, dim=-1)
    logp = ls.gather(1, t[:, None]).squeeze(1)
    ent = -(ls.exp() * ls).sum(-1)
    return logp, ent


def _inputs(T=9, H=6, V=13, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_()
    t = torch.randint(0, V, (T,), generator=g)
    return h, w, t


def test_gradcheck_float64():
    h, w, t = _inputs()
    for temp, chunk in [(1.0, 4), (0.6, 1), (1.7, 100)]:
        fn = lambda h, w: token_logprobs_and_entropy(h, w, t, temperature=temp, chunk_size=chunk)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (h, w))


def test_gradcheck_float64_padded_vocab():
    h, w, t = _inputs(V=13)
    t = t % 10
    fn = lambda h, w: token_logprobs_and_entropy(h, w, t, vocab_size=10, chunk_size=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, w))


@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_matches_naive_values_and_grads(temp):
    h, w, t = _inputs(T=17, H=8, V=31)
    lp, ent = token_logprobs_and_entropy(h, w, t, temperature=temp, chunk_size=5)
    g1, g2 = torch.randn(17, dtype=torch.float64), torch.randn(17, dtype=torch.float64)
    gh, gw = torch.autograd.grad((lp * g1).sum() + (ent * g2).sum(), (h, w))
    lp_r, ent_r = naive(h, w, t, temp)
    gh_r, gw_r = torch.autograd.grad((lp_r * g1).sum() + (ent_r * g2).sum(), (h, w))
    for a, b in [(lp, lp_r), (ent, ent_r), (gh, gh_r), (gw, gw_r)]:
        assert torch.allclose(a, b, atol=1e-10)


def test_padded_rows_get_zero_grad_and_are_not_in_softmax():
    h, w, t = _inputs(V=16)
    t = t % 12
    lp, ent = token_logprobs_and_entropy(h, w, t, vocab_size=12, chunk_size=4)
    lp_r, ent_r = naive(h, w, t, vocab_size=12)
    assert torch.allclose(lp, lp_r) and torch.allclose(ent, ent_r)
    (gw,) = torch.autograd.grad(lp.sum(), (w,))
    assert (gw[12:] == 0).all() and (gw[:12] != 0).any()


def test_float32_and_bfloat16_inputs_give_float32_close_to_float64():
    h, w, t = _inputs(T=20, H=16, V=50)
    lp_r, ent_r = naive(h, w, t)
    for dtype, tol in [(torch.float32, 1e-4), (torch.bfloat16, 0.2)]:
        hh = h.detach().to(dtype).requires_grad_()
        ww = w.detach().to(dtype).requires_grad_()
        lp, ent = token_logprobs_and_entropy(hh, ww, t, chunk_size=7)
        assert lp.dtype == torch.float32
        assert torch.allclose(lp.double(), lp_r, atol=tol) and torch.allclose(ent.double(), ent_r, atol=tol)
        gh, gw = torch.autograd.grad(lp.sum() + ent.sum(), (hh, ww))
        assert gh.dtype == dtype and gw.dtype == dtype and torch.isfinite(gw.float()).all()


def test_only_one_output_used_and_shape_errors():
    h, w, t = _inputs()
    lp, _ = token_logprobs_and_entropy(h, w, t)
    (gh,) = torch.autograd.grad(lp.sum(), (h,))
    gh_r = torch.autograd.grad(naive(h, w, t)[0].sum(), (h,))[0]
    assert torch.allclose(gh, gh_r)
    with pytest.raises(ValueError, match="share H"):
        token_logprobs_and_entropy(h, w[:, :3], t)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_and_entropy(h, w, t, temperature=0.0)
