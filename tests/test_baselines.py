"""ProtoNet and R2-D2 (docs/algorithm.md baselines) against float64 references, in train/eval and on workers."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from amfs_dist.algorithms import kernel, protonet
from amfs_dist.algorithms.learner import MetaLearner
from amfs_dist.cli import main
from amfs_dist.config import ConfigError, load_config
from amfs_dist.data import make_task_source
from helpers import assert_whole_queries


def _features(n=7, q=5, d=6, ways=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    zs = 3.0 * torch.randn(n, d, generator=g, dtype=dtype)  # raw features: not unit norm
    zq = 3.0 * torch.randn(q, d, generator=g, dtype=dtype)
    ys = torch.arange(n) % ways
    return zs, zq, ys, (ys[:, None] == torch.arange(ways)).to(dtype)


def _reference_proto_logits(zs, zq, ys, ways):
    """By the definition, one class and one query at a time, in float64."""
    zs, zq = zs.double(), zq.double()
    out = torch.empty(len(zq), ways, dtype=torch.float64)
    for k in range(ways):
        c = zs[ys == k].mean(0)
        for j in range(len(zq)):
            out[j, k] = -((zq[j] - c) ** 2).sum()
    return out


def _reference_ridge(zs, zq, Y, lam):
    """Primal ridge regression W = (Zs^T Zs + lam I)^-1 Zs^T Y in float64; predictions Zq W."""
    zs, zq, Y = zs.double(), zq.double(), Y.double()
    W = torch.linalg.solve(zs.T @ zs + lam * torch.eye(zs.shape[1], dtype=torch.float64), zs.T @ Y)
    return zq @ W


def test_prototype_logits_match_the_definition():
    zs, zq, ys, Y = _features()
    ref = _reference_proto_logits(zs, zq, ys, 3)
    torch.testing.assert_close(protonet.logits(zq, protonet.prototypes(zs, Y)), ref)
    # float32 against the float64 reference
    got32 = protonet.logits(zq.float(), protonet.prototypes(zs.float(), Y.float()))
    torch.testing.assert_close(got32.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n,d", [(7, 6), (10, 4)])  # n <= d and n > d (a rank-deficient K)
def test_linear_kernel_solve_is_primal_ridge_regression(n, d):
    zs, zq, ys, Y = _features(n=n, d=d)
    ref = _reference_ridge(zs, zq, Y, 0.3)
    alpha = kernel.solve_coefficients(kernel.linear_kernel(zs, zs), Y, 0.3, 0.0)
    torch.testing.assert_close(kernel.linear_kernel(zq, zs) @ alpha, ref)
    zs32, zq32 = zs.float(), zq.float()
    alpha32 = kernel.solve_coefficients(kernel.linear_kernel(zs32, zs32), Y.float(), 0.3, 0.0)
    torch.testing.assert_close((kernel.linear_kernel(zq32, zs32) @ alpha32).double(), ref,
                               rtol=1e-3, atol=1e-4)


def test_gradcheck_through_the_linear_kernel_solve():
    zs, zq, _, Y = _features(n=5, q=3, d=4)
    zs, zq = zs.clone().requires_grad_(True), zq.clone().requires_grad_(True)
    log_lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def f(zs, zq, log_lam):
        alpha = kernel.solve_coefficients(kernel.linear_kernel(zs, zs), Y, torch.exp(log_lam), 0.0)
        return (w * (kernel.linear_kernel(zq, zs) @ alpha)).sum()

    assert gradcheck(f, (zs, zq, log_lam), eps=1e-6, atol=1e-6)


def _learner(tiny, *extra):
    cfg = load_config(None, tiny + list(extra))
    source = make_task_source(cfg)
    learner = MetaLearner(cfg, source.input_shape)
    learner.module.double()
    ep = source.sample("train", 1, [0]).to("cpu", torch.float64)
    return learner, ep.xs[0], ep.ys[0], ep.xq[0], ep.yq[0]


def test_protonet_learner_loss_is_the_reference(tiny):
    learner, xs, ys, xq, yq = _learner(tiny, "method=protonet")
    params = learner.params()
    assert set(k for k in params if k.startswith("head.")) == {"head.scale"}
    with torch.no_grad():
        params["head.scale"].fill_(0.7)
        z = learner._features(params, torch.cat([xs, xq]), len(xs))  # raw, not normalised
        ref = 0.7 * _reference_proto_logits(z[:len(xs)], z[len(xs):], ys, 3)
        loss, acc = learner.task_loss(params, xs, ys, xq, yq)
    torch.testing.assert_close(loss, F.cross_entropy(ref, yq))
    torch.testing.assert_close(acc, (ref.argmax(-1) == yq).double().mean())


def test_r2d2_learner_loss_is_ridge_regression_on_raw_features(tiny):
    learner, xs, ys, xq, yq = _learner(tiny, "method=r2d2", "kernel.lam=0.4")
    params = learner.params()
    # learned scale and lambda, no bandwidth
    assert set(k for k in params if k.startswith("head.")) == {"head.scale", "head.log_lam"}
    assert not learner.constants
    with torch.no_grad():
        z = learner._features(params, torch.cat([xs, xq]), len(xs))
        Y = (ys[:, None] == torch.arange(3)).double()
        ref = params["head.scale"] * _reference_ridge(z[:len(xs)], z[len(xs):], Y, 0.4)
        loss, _ = learner.task_loss(params, xs, ys, xq, yq)
    torch.testing.assert_close(loss, F.cross_entropy(ref, yq))  # mu = gamma = 0: no penalty


def test_presets_and_their_keys():
    r2d2 = load_config(None, ["method=r2d2"])
    k = r2d2.kernel
    assert (r2d2.inner_loop, r2d2.outer_weighting) == ("kernel", "mean")
    assert (k.type, k.normalize, k.mu, k.gamma, k.learn_lam) == ("linear", False, 0.0, 0.0, True)
    amfs = load_config()
    assert (amfs.kernel.type, amfs.kernel.normalize, amfs.kernel.mu) == ("rbf", True, 0.05)
    # a preset's keys can be overridden; the name follows what runs
    assert load_config(None, ["method=r2d2", "kernel.lam=2"]).method_name == "r2d2"
    assert load_config(None, ["method=r2d2", "outer.weighting=cosine"]).method_name == \
        "linear-kernel+cosine"
    assert load_config(None, ["method=iamfs", "kernel.type=linear"]).method_name == "r2d2"
    assert load_config(None, ["method=protonet"]).method_name == "protonet"
    assert load_config(None, ["inner=protonet", "outer.weighting=cosine"]).method_name == \
        "protonet+cosine"
    # the method's defaults are not frozen into the config: switching method switches them
    assert r2d2.replace(method="amfs").kernel.type == "rbf"
    assert r2d2.to_flat()["kernel.type"] is None
    assert load_config(None, ["method=r2d2", "kernel.mu=0.1"]).replace(method="amfs").kernel.mu == 0.1


@pytest.mark.parametrize("override,key", [
    pytest.param(["kernel.type=poly"], "kernel.type", id="unknown-kernel-type"),
    pytest.param(["method=protonet", "data.source=sinusoid"], "method", id="protonet-method-on-regression"),
    pytest.param(["inner=protonet", "data.source=sinusoid"], "inner", id="protonet-inner-on-regression")])
def test_bad_baseline_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, override)


@pytest.mark.parametrize("method", ["protonet", "r2d2"])
def test_train_then_eval(method, tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", *tiny, "train.steps=2",
                 f"method={method}"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == method
    assert_whole_queries(result["test_accuracy"], episodes=6, ways=3, queries=2)  # tiny's eval
    assert main(["eval", str(run), "--episodes", "6"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["method"] == method
    # the same model on the same 6 test episodes
    assert evaluated["test_accuracy"] == pytest.approx(result["test_accuracy"], abs=1e-9)
    assert evaluated["test_accuracy"] == pytest.approx(result["test_accuracy"], abs=1e-6)


@pytest.mark.ray
@pytest.mark.slow
def test_workers_give_the_in_process_parameters(ray_session, tiny, tmp_path):
    """The learner is the same code on shard workers: 2 workers = in-process, for both."""
    from amfs_dist.train import Trainer

    for method in ("protonet", "r2d2"):
        states = []
        for workers in (0, 2):
            cfg = load_config(None, tiny + ["train.steps=2", f"method={method}",
                                            f"dist.workers={workers}", "dist.cpus_per_worker=0.5"])
            trainer = Trainer(cfg, tmp_path / f"{method}-{workers}")
            trainer.run_dir.mkdir()
            try:
                trainer.fit(progress=False)
            finally:
                trainer.close()
            states.append(trainer.learner.module.state_dict())
        for name, value in states[0].items():
            torch.testing.assert_close(states[1][name], value, atol=1e-6, rtol=1e-5)
