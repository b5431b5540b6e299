"""Test-time fine-tuning (eval.finetune_steps): the encoder takes SGD steps on each head's
support loss before predicting, per task, inside the vmapped evaluation."""
import dataclasses

import pytest
import torch
from torch.func import vmap

from amfs_dist.algorithms.learner import MetaLearner
from amfs_dist.config import ConfigError, load_config
from amfs_dist.data import make_task_source

# one method per head (r2d2: the kernel head's linear ridge form)
METHODS = ["amfs", "r2d2", "protonet", "metaoptnet", "maml", "fomaml"]


def _setup(method, tiny, *overrides):
    cfg = load_config(None, tiny + [f"method={method}", *overrides])
    source = make_task_source(cfg, training=False)
    learner = MetaLearner(cfg, source.input_shape)
    params = {k: v.detach() for k, v in learner.params().items()}
    return cfg, learner, params, source.sample("test", 0, [0, 1, 2], queries=2)


def _support_losses(learner, params, ep, finetuned):
    ep = ep.to("cpu")
    with torch.enable_grad():
        return vmap(lambda xs, ys: learner.support_loss(
            learner.finetune(params, xs, ys) if finetuned else params, xs, ys))(ep.xs, ep.ys)


@pytest.mark.parametrize("method", ["amfs", "maml"])
def test_zero_steps_is_the_plain_evaluation(method, tiny):
    cfg, learner, params, ep = _setup(method, tiny, "eval.finetune_steps=0")
    loss, acc = learner.evaluate(params, ep)
    batch = ep.to("cpu")
    with torch.enable_grad():
        plain = vmap(lambda xs, ys, xq, yq: learner.task_loss(params, xs, ys, xq, yq, False))(
            batch.xs, batch.ys, batch.xq, batch.yq)
    assert torch.equal(loss, plain[0].detach()) and torch.equal(acc, plain[1].detach())
    assert learner.finetune(params, batch.xs[0], batch.ys[0]) is params


@pytest.mark.parametrize("method", METHODS)
def test_finetuning_lowers_the_support_loss_and_changes_the_predictions(method, tiny):
    # 1-shot (tiny): a leave-one-out loss must still give every head a gradient
    cfg, learner, params, ep = _setup(method, tiny, "eval.finetune_lr=0.0001")
    before_loss, _ = learner.evaluate(params, ep)
    learner.cfg = cfg.replace(**{"eval.finetune_steps": 1})
    after_loss, after_acc = learner.evaluate(params, ep)
    assert torch.isfinite(after_loss).all() and ((after_acc >= 0) & (after_acc <= 1)).all()
    assert not torch.allclose(before_loss, after_loss)
    before, after = (_support_losses(learner, params, ep, f) for f in (False, True))
    assert (after < before).all(), (before, after)


def test_last_block_finetuning_changes_only_the_last_block(tiny):
    cfg, learner, params, ep = _setup("protonet", tiny, "eval.finetune_steps=1",
                                      "eval.finetune_params=last")
    batch = ep.to("cpu")
    with torch.enable_grad():
        tuned = learner.finetune(params, batch.xs[0], batch.ys[0])
    changed = {k for k in params if not torch.equal(params[k], tuned[k])}
    assert changed and all(k.startswith("backbone.blocks.3.") for k in changed)
    learner.cfg = cfg.replace(**{"eval.finetune_params": "all"})
    with torch.enable_grad():
        tuned = learner.finetune(params, batch.xs[0], batch.ys[0])
    assert any(not torch.equal(params[k], tuned[k]) for k in params if ".blocks.0." in k)
    assert all(torch.equal(params[k], tuned[k]) for k in params if k.startswith("head."))


@pytest.mark.parametrize("method", ["amfs", "maml"])
def test_batched_finetuning_equals_one_task_at_a_time(method, tiny):
    _, learner, params, ep = _setup(method, tiny, "eval.finetune_steps=2")
    loss, acc = learner.evaluate(params, ep)
    for t in range(3):
        one = dataclasses.replace(ep, xs=ep.xs[t:t + 1], ys=ep.ys[t:t + 1], xq=ep.xq[t:t + 1],
                                  yq=ep.yq[t:t + 1])
        single_loss, single_acc = learner.evaluate(params, one)
        torch.testing.assert_close(single_loss[0], loss[t], rtol=1e-4, atol=1e-5)
        assert single_acc[0] == acc[t]


@pytest.mark.parametrize("override", ["eval.finetune_steps=-1", "eval.finetune_lr=0",
                                      "eval.finetune_params=first"])
def test_bad_finetune_settings_name_the_key(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])


def test_the_generic_leave_one_out_equals_the_feature_heads_one_pass_form(tiny):
    """Head.support_loss (what a new head inherits: one adapt_predict per left-out example)
    and FeatureHead's (the support encoded once) agree where the encoder has no batch norm."""
    from amfs_dist.algorithms.heads.base import PREFIX, Head
    cfg = load_config(None, ["data.source=sinusoid", "data.shots=5", "method=amfs"])
    source = make_task_source(cfg, training=False)
    learner = MetaLearner(cfg, source.input_shape)
    ep = source.sample("test", 0, [0]).to("cpu")
    params = {**{PREFIX + k: v for k, v in learner.head.named_buffers()},
              **{k: v.detach() for k, v in learner.params().items()}}
    args = (params, learner._features, ep.xs[0], ep.ys[0], 1)
    generic, one_pass = Head.support_loss(learner.head, *args), learner.head.support_loss(*args)
    torch.testing.assert_close(generic, one_pass)
    assert one_pass > 0
