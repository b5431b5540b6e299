"""MAML / FO-MAML meta-gradients against hand-derived formulas, and vmap against a loop."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad

from amfs_dist.algorithms import maml
from amfs_dist.algorithms.learner import MetaLearner
from amfs_dist.config import load_config
from amfs_dist.data import make_task_source


def _linear_task(seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    ys, yq = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    w = torch.randn(3, generator=g, dtype=torch.float64)
    return w, xs, ys, xq, yq


def _mse(params, x, y):
    return ((x @ params["w"] - y) ** 2).mean()


def _meta_grad(first_order, lr=0.1):
    w, xs, ys, xq, yq = _linear_task()

    def outer(params):
        fast = maml.adapt(_mse, params, xs, ys, steps=1, lr=lr, first_order=first_order)
        return _mse(fast, xq, yq)

    return grad(outer)({"w": w})["w"], (w, xs, ys, xq, yq, lr)


def test_second_order_meta_gradient_matches_hand_derivation():
    got, (w, xs, ys, xq, yq, lr) = _meta_grad(first_order=False)
    n, m = len(ys), len(yq)
    # L_s = 1/n ||Xs w - ys||^2: grad = 2/n Xs^T (Xs w - ys), Hessian = 2/n Xs^T Xs
    w_fast = w - lr * 2 / n * xs.T @ (xs @ w - ys)
    grad_q = 2 / m * xq.T @ (xq @ w_fast - yq)
    expected = (torch.eye(3, dtype=torch.float64) - lr * 2 / n * xs.T @ xs) @ grad_q
    torch.testing.assert_close(got, expected)


def test_first_order_meta_gradient_is_query_gradient_at_adapted_params():
    got, (w, xs, ys, xq, yq, lr) = _meta_grad(first_order=True)
    n, m = len(ys), len(yq)
    w_fast = w - lr * 2 / n * xs.T @ (xs @ w - ys)
    torch.testing.assert_close(got, 2 / m * xq.T @ (xq @ w_fast - yq))
    second, _ = _meta_grad(first_order=False)
    assert not torch.allclose(got, second)


def _learner(tiny, *extra):
    """A float64 learner, so that comparisons are exact up to rounding."""
    cfg = load_config(None, tiny + list(extra))
    source = make_task_source(cfg)
    learner = MetaLearner(cfg, source.input_shape)
    learner.module.double()
    return learner, source


def _sample(source, split, step, ids):
    return source.sample(split, step, ids).to("cpu", torch.float64)


@pytest.mark.parametrize("method", ["amfs", "maml", "fomaml", "protonet", "r2d2", "metaoptnet"])
def test_vmapped_per_task_gradients_equal_a_loop_over_tasks(tiny, method):
    learner, source = _learner(tiny, f"method={method}")
    ep = _sample(source, "train", 3, list(range(4)))
    params = learner.load_flat(learner.flat_params())
    batched = learner.meta_gradients(params, ep)
    assert batched.grads.shape == (4, learner.layout.size)
    for t in range(4):
        single = learner.meta_gradients(params, ep.index(slice(t, t + 1)))
        torch.testing.assert_close(batched.grads[t], single.grads[0], rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(batched.loss[t], single.loss[0], rtol=1e-7, atol=1e-9)
    # and the loop computed with plain autograd, one task at a time, agrees
    live = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss, _ = learner.task_loss(live, ep.xs[1], ep.ys[1], ep.xq[1], ep.yq[1])
    ref = torch.autograd.grad(loss, list(live.values()), allow_unused=True)
    ref = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                     for g, p in zip(ref, live.values())])
    torch.testing.assert_close(batched.grads[1], ref, rtol=1e-7, atol=1e-9)


def test_kernel_first_order_sends_no_gradient_through_alpha(tiny):
    learner, source = _learner(tiny, "method=amfs", "kernel.first_order=true")
    cfg = learner.cfg
    ep = _sample(source, "train", 0, [0])
    params = {k: v.detach().clone().requires_grad_(True) for k, v in learner.params().items()}
    p = {**learner.constants, **params}
    xs, ys, xq, yq = ep.xs[0], ep.ys[0], ep.xq[0], ep.yq[0]
    from amfs_dist.algorithms import kernel
    z = F.normalize(learner._features(params, torch.cat([xs, xq]), len(xs)), dim=-1)
    zs, zq = z[:len(xs)], z[len(xs):]
    lam = torch.exp(p["head.log_lam"])
    K = kernel.rbf_kernel(zs, zs, p["head.log_bandwidth"])
    with torch.no_grad():  # alpha as a constant, computed apart
        alpha = kernel.solve_coefficients(K, (ys[:, None] == torch.arange(3)).double(), lam, cfg.kernel.mu)
    logits = p["head.scale"] * kernel.rbf_kernel(zq, zs, p["head.log_bandwidth"]) @ alpha
    loss = F.cross_entropy(logits, yq) + cfg.kernel.gamma * kernel.information_term(K, lam) / len(xs)
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])
    fo = learner.meta_gradients(learner.load_flat(learner.flat_params()), ep).grads[0]
    torch.testing.assert_close(fo, ref, rtol=1e-7, atol=1e-9)
    so_learner, _ = _learner(tiny, "method=amfs")
    so_learner.module.load_state_dict(learner.module.state_dict())
    so = so_learner.meta_gradients(so_learner.load_flat(so_learner.flat_params()), ep).grads[0]
    assert not torch.allclose(fo, so, rtol=1e-3, atol=1e-6)


def test_batch_norm_is_not_transductive(tiny):
    """A query's prediction depends on the support set and itself, never on other queries."""
    for method in ("amfs", "maml"):
        learner, source = _learner(tiny, f"method={method}")
        ep = _sample(source, "test", 0, [0, 1])
        other = ep.xq.clone()
        other[0, 1:] = ep.xq[1, 1:]  # all queries but the first replaced by another task's
        params = learner.params()
        with torch.enable_grad():
            out, _ = learner.adapt_predict(params, ep.xs[0], ep.ys[0], ep.xq[0], training=False)
            out_other, _ = learner.adapt_predict(params, ep.xs[0], ep.ys[0], other[0], training=False)
        torch.testing.assert_close(out[0], out_other[0])
        assert not torch.allclose(out[1:], out_other[1:])


@pytest.mark.parametrize("method,per_task_cos", [("amfs", 0.9), ("maml", None)])
def test_bf16_autocast_keeps_the_meta_gradient_direction(tiny, method, per_task_cos):
    """bf16 follows fp32 closely for the kernel inner loop; second-order MAML through bf16
    convolutions is noisier per task (cosine 0.4-0.99 at width 8), its mean direction holds."""
    torch.manual_seed(0)
    cfg = load_config(None, tiny + [f"method={method}", "train.precision=bf16"])
    source = make_task_source(cfg)
    half = MetaLearner(cfg, source.input_shape)
    full = MetaLearner(cfg.replace(**{"train.precision": "fp32"}), source.input_shape)
    full.module.load_state_dict(half.module.state_dict())
    ep = source.sample("train", 0, [0, 1, 2])
    g_half = half.meta_gradients(half.load_flat(half.flat_params()), ep).grads
    g_full = full.meta_gradients(full.load_flat(full.flat_params()), ep).grads
    assert g_half.dtype == torch.float32 and torch.isfinite(g_half).all()
    if per_task_cos is not None:
        assert torch.all(F.cosine_similarity(g_half, g_full) > per_task_cos)
    assert F.cosine_similarity(g_half.mean(0), g_full.mean(0), dim=0) > 0.8


@pytest.mark.parametrize("method", ["amfs", "maml"])
def test_task_chunks_give_the_same_gradients(tiny, method):
    """train.task_chunk bounds memory by vmapping a few tasks at a time; results are the same."""
    learner, source = _learner(tiny, f"method={method}")
    chunked, _ = _learner(tiny, f"method={method}", "train.task_chunk=2")
    chunked.module.load_state_dict(learner.module.state_dict())
    ep = _sample(source, "train", 0, list(range(5)))
    whole = learner.meta_gradients(learner.load_flat(learner.flat_params()), ep)
    parts = chunked.meta_gradients(chunked.load_flat(chunked.flat_params()), ep)
    torch.testing.assert_close(parts.grads, whole.grads, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(chunked.evaluate(chunked.params(), ep)[1],
                               learner.evaluate(learner.params(), ep)[1])
