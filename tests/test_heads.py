"""The head registry and MetaOptNet's SVM head against float64 references."""
import cvxpy as cp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.func import vmap

from amfs_dist.algorithms.heads import HEADS, INNER_LOOPS, PRESETS, head_class
from amfs_dist.algorithms.heads.base import Head
from amfs_dist.algorithms.heads.svm import dual_objective, project_rows_to_simplex, solve_dual
from amfs_dist.algorithms.learner import MetaLearner
from amfs_dist.config import ConfigError, load_config
from amfs_dist.data import make_task_source
from amfs_dist.errors import UserError


def _features(n=6, d=8, ways=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.arange(n) % ways
    return z, y, (y[:, None] == torch.arange(ways)).double()


def _reference_svm(z, y, ways, c):
    """The Crammer-Singer SVM solved in the primal by cvxpy (Clarabel, tight tolerances):
    min 1/2 sum_k ||w_k||^2 + c sum_n xi_n  s.t.  w_{y_n}.z_n - w_k.z_n >= 1 - [k = y_n] - xi_n.
    Returns W [d, ways] and the optimal value."""
    z, y = z.numpy(), y.numpy()
    n, d = z.shape
    Y = np.eye(ways)[y]
    W, xi = cp.Variable((d, ways)), cp.Variable(n)
    scores = z @ W
    true_score = cp.sum(cp.multiply(scores, Y), axis=1, keepdims=True)
    margins = true_score @ np.ones((1, ways)) - scores
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(W) + c * cp.sum(xi)),
                         [margins >= 1 - Y - cp.reshape(xi, (n, 1), order="C") @ np.ones((1, ways))])
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return torch.from_numpy(W.value), problem.value


@pytest.mark.parametrize("n,d,ways,c", [(5, 16, 5, 0.1), (12, 6, 3, 1.0), (10, 32, 5, 10.0)])
def test_svm_dual_solve_matches_the_primal_reference(n, d, ways, c):
    """Every regime: margins all active (small c), slack at the box (n > d, c = 1), hard
    margin (large c). w = Z_s^T alpha is unique, and the dual value equals the primal's."""
    z, y, Y = _features(n, d, ways)
    alpha = solve_dual(z @ z.T, Y, c, steps=3000)
    W_ref, value_ref = _reference_svm(z, y, ways, c)
    torch.testing.assert_close(z.T @ alpha, W_ref, rtol=1e-5, atol=1e-6)
    # constraints: alpha_nk <= c [k = y_n], rows sum to 0
    assert torch.all(alpha <= c * Y + 1e-12)
    torch.testing.assert_close(alpha.sum(1), torch.zeros(n, dtype=torch.float64))
    dual_value = -c * dual_objective(Y - alpha / c, z @ z.T, Y, c) + c * n
    assert float(dual_value) == pytest.approx(value_ref, rel=1e-6)


def test_simplex_projection_matches_the_reference():
    v = torch.randn(20, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    ours = project_rows_to_simplex(v)
    for row, got in zip(v.numpy(), ours):
        b = cp.Variable(5)
        cp.Problem(cp.Minimize(cp.sum_squares(b - row)), [b >= 0, cp.sum(b) == 1]).solve(
            solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        torch.testing.assert_close(got, torch.from_numpy(b.value), rtol=1e-6, atol=1e-7)


def test_gradcheck_through_the_svm_solve():
    zs, ys, Y = _features(6, 5, 3)
    zq = torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def logits(zs, zq):
        return (zq @ zs.T) @ solve_dual(zs @ zs.T, Y, 0.5, steps=20)

    assert gradcheck(logits, (zs.requires_grad_(), zq.requires_grad_()), eps=1e-6, atol=1e-6)


def test_batched_svm_solve_equals_per_task_solves():
    tasks = [_features(6, 8, 3, seed=s) for s in range(4)]
    K = torch.stack([z @ z.T for z, _, _ in tasks])
    Y = torch.stack([Y for _, _, Y in tasks])
    batched = vmap(lambda K, Y: solve_dual(K, Y, 0.1, steps=30))(K, Y)
    for t in range(4):
        torch.testing.assert_close(batched[t], solve_dual(K[t], Y[t], 0.1, steps=30))


def test_metaoptnet_learner_loss_is_the_svm_on_raw_features(tiny):
    cfg = load_config(None, tiny + ["method=metaoptnet", "svm.c=0.5", "svm.steps=3000"])
    source = make_task_source(cfg)
    learner = MetaLearner(cfg, source.input_shape)
    learner.module.double()
    ep = source.sample("train", 1, [0]).to("cpu", torch.float64)
    xs, ys, xq, yq = ep.xs[0], ep.ys[0], ep.xq[0], ep.yq[0]
    params = learner.params()
    assert set(k for k in params if k.startswith("head.")) == {"head.scale"}
    with torch.no_grad():
        params["head.scale"].fill_(0.7)
        z = learner._features(params, torch.cat([xs, xq]), len(xs))
        W, _ = _reference_svm(z[:len(xs)], ys, 3, 0.5)
        loss, acc = learner.task_loss(params, xs, ys, xq, yq)
    ref = 0.7 * z[len(xs):] @ W
    torch.testing.assert_close(loss, F.cross_entropy(ref, yq), rtol=1e-5, atol=1e-6)
    assert float(acc) == float((ref.argmax(-1) == yq).double().mean())


def test_every_inner_loop_is_a_registered_head_and_every_method_a_preset():
    assert set(INNER_LOOPS) == set(HEADS) and {p["inner"] for p in PRESETS.values()} == set(HEADS)
    assert {"amfs", "iamfs", "oamfs", "maml", "fomaml", "protonet", "r2d2", "metaoptnet"} == set(PRESETS)
    for inner in INNER_LOOPS:
        assert issubclass(head_class(inner), Head)
    cfg = load_config(None, ["method=metaoptnet"])
    assert (cfg.inner_loop, cfg.outer_weighting, cfg.method_name) == ("svm", "mean", "metaoptnet")
    assert load_config(None, ["inner=svm", "outer.weighting=cosine"]).method_name == "svm+cosine"


@pytest.mark.parametrize("override,key", [(["svm.c=0"], "svm.c"), (["svm.steps=0"], "svm.steps"),
                                          (["svm.c=nan"], "svm.c"),
                                          (["method=metaoptnet", "data.source=sinusoid"], "method"),
                                          (["inner=svm", "data.source=sinusoid"], "inner")])
def test_bad_svm_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config(None, override)


@pytest.mark.parametrize("method", ["amfs", "protonet", "r2d2", "metaoptnet"])
def test_heads_built_from_the_support_set_test_on_any_number_of_ways(tiny, method):
    """A model trained 3-way tests on 5-way episodes: the head is built from the support set."""
    cfg = load_config(None, tiny + [f"method={method}"])
    learner = MetaLearner(cfg, make_task_source(cfg).input_shape)
    ep = make_task_source(cfg.replace(**{"data.ways": 5})).sample("test", 0, [0, 1]).to("cpu")
    assert ep.ways == 5
    loss, acc = learner.evaluate(learner.params(), ep)
    assert torch.isfinite(loss).all() and loss.shape == (2,)
    out, _ = learner.adapt_predict(learner.params(), ep.xs[0], ep.ys[0], ep.xq[0], False, ways=5)
    assert out.shape == (len(ep.xq[0]), 5)


def test_a_maml_model_refuses_another_number_of_ways(tiny):
    cfg = load_config(None, tiny + ["method=maml"])
    learner = MetaLearner(cfg, make_task_source(cfg).input_shape)
    ep = make_task_source(cfg.replace(**{"data.ways": 5})).sample("test", 0, [0])
    with pytest.raises(UserError, match="^data.ways: .*3 ways, not 5"):
        learner.evaluate(learner.params(), ep)


def test_metaoptnet_is_in_the_compare_experiment_and_the_train_benchmark():
    from amfs_dist.benchmarks.train import METHODS
    from amfs_dist.experiment.spec import load_experiment

    compared = {cell.values["method"] for cell in load_experiment("compare").cells()}
    assert {"amfs", "protonet", "r2d2", "metaoptnet"} <= compared
    assert set(METHODS) == set(PRESETS)


def test_a_new_learner_config_reaches_the_head(tiny):
    """amfs bench adapt sets learner.cfg to test one model with several maml.test_steps."""
    cfg = load_config(None, tiny + ["method=maml", "maml.test_steps=0"])
    learner = MetaLearner(cfg, make_task_source(cfg).input_shape)
    ep = make_task_source(cfg).sample("test", 0, [0]).to("cpu")
    unadapted, _ = learner.adapt_predict(learner.params(), ep.xs[0], ep.ys[0], ep.xq[0], False)
    learner.cfg = cfg.replace(**{"maml.test_steps": 2})
    assert learner.cfg.maml.test_steps == 2
    adapted, _ = learner.adapt_predict(learner.params(), ep.xs[0], ep.ys[0], ep.xq[0], False)
    assert not torch.allclose(adapted, unadapted)


def test_non_finite_features_give_non_finite_svm_outputs_not_an_error():
    """The trainer leaves out a task whose loss is not finite; the solve must not raise."""
    z, _, Y = _features(6, 8, 3)
    z[2, 0] = float("nan")
    alpha = vmap(lambda K, Y: solve_dual(K, Y, 0.1, steps=5))((z @ z.T)[None], Y[None])
    assert not torch.isfinite(alpha).all()


@pytest.fixture
def registry_restored():
    """The head registry as it was, after a test that registers a head."""
    from amfs_dist.algorithms import heads
    saved = dict(heads.HEADS), dict(heads.PRESETS), dict(heads._registered)
    yield heads
    for live, copy in zip((heads.HEADS, heads.PRESETS, heads._registered), saved):
        live.clear()
        live.update(copy)


def test_a_registered_head_is_a_method_like_the_built_in_ones(registry_restored, tiny):
    from amfs_dist.algorithms.heads.protonet import ProtoNetHead
    from amfs_dist.algorithms.learner import MetaLearner
    from amfs_dist.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="method"):
        load_config(None, [*tiny, "method=myproto"])

    class MyProto(ProtoNetHead):
        pass

    registry_restored.register("myproto_head", MyProto, {"myproto": {"outer.weighting": "mean"}})
    cfg = load_config(None, [*tiny, "method=myproto"])
    assert cfg.inner_loop == "myproto_head" and cfg.outer_weighting == "mean"
    assert isinstance(MetaLearner(cfg, (1, 28, 28)).head, MyProto)
    with pytest.raises(ValueError, match="myproto_head, myproto already taken"):
        registry_restored.register("myproto_head", MyProto, {"myproto": {}})
    with pytest.raises(ValueError, match="amfs already taken"):
        registry_restored.register("other", MyProto, {"amfs": {}})
