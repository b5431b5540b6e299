"""O-AMFS weighting (docs/algorithm.md)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amfs_dist.algorithms.learner import MetaLearner
from amfs_dist.algorithms.outer import agreement, agreement_columns, combine, task_weights
from amfs_dist.config import load_config
from amfs_dist.train import Trainer


def test_identical_gradients_give_uniform_weights():
    g = torch.randn(1, 50).repeat(6, 1)
    for normalize in ("clip", "softmax"):
        w = task_weights(g, "cosine", normalize).weights
        torch.testing.assert_close(w, torch.full((6,), 1 / 6, dtype=torch.float64))


def test_opposing_task_gets_zero_weight_under_clip():
    base = torch.randn(50)
    g = torch.stack([base + 0.1 * torch.randn(50) for _ in range(5)] + [-base])
    tw = task_weights(g, "cosine", "clip")
    assert tw.weights[-1] == 0.0
    assert torch.all(tw.weights[:-1] > 0)
    assert tw.agreement[-1] < 0


def test_agreement_is_mean_cosine_with_the_others():
    g = torch.randn(4, 10, dtype=torch.float64)
    a = agreement(g)
    for i in range(4):
        cos = [torch.nn.functional.cosine_similarity(g[i], g[j], dim=0) for j in range(4) if j != i]
        torch.testing.assert_close(a[i], torch.stack(cos).mean())


def test_all_disagreeing_tasks_fall_back_to_uniform():
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    torch.testing.assert_close(task_weights(g, "cosine", "clip").weights,
                               torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_mean_mode_is_the_plain_average():
    g = torch.randn(5, 20, dtype=torch.float64)
    tw = task_weights(g, "mean")
    torch.testing.assert_close(combine(g, tw.weights), g.mean(0))


def test_softmax_temperature_sharpens():
    g = torch.randn(6, 30)
    soft = task_weights(g, "cosine", "softmax", temperature=10.0).weights
    sharp = task_weights(g, "cosine", "softmax", temperature=0.01).weights
    assert soft.max() - soft.min() < sharp.max() - sharp.min()
    assert int(sharp.argmax()) == int(agreement(g).argmax())


@settings(max_examples=60, deadline=None)
@given(t=st.integers(1, 12), p=st.integers(1, 40), seed=st.integers(0, 10_000),
       normalize=st.sampled_from(["clip", "softmax"]))
def test_weights_are_a_distribution(t, p, seed, normalize):
    g = torch.randn(t, p, generator=torch.Generator().manual_seed(seed))
    tw = task_weights(g, "cosine", normalize)
    assert tw.weights.shape == (t,)
    assert torch.all(tw.weights >= 0)
    torch.testing.assert_close(tw.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.all(tw.agreement >= -1 - 1e-9) and torch.all(tw.agreement <= 1 + 1e-9)
    summary = tw.summary()
    assert set(summary) == {"weights", "weight_entropy", "agreement_min", "agreement_max"}


def _reference_agreement(g: torch.Tensor) -> torch.Tensor:
    """float64, each row normalised first (exact in float64 for these norms)."""
    g = g.double()
    norms = g.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, g / norms.clamp_min(1e-300), torch.zeros_like(g))
    cos = unit @ unit.T
    t = g.shape[0]
    return (cos.sum(1) - cos.diagonal()) / (t - 1)


def test_agreement_is_exact_at_any_gradient_scale():
    """Task gradients of norm 1e-30 .. 1e30 in one float32 matrix: the float32 Gram matrix
    of the raw rows overflows (NaN) or underflows (0), which made the weights uniform."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(300, generator=gen, dtype=torch.float64)
    directions = torch.stack([base + s * torch.randn(300, generator=gen, dtype=torch.float64)
                              for s in (0.3, 0.5, 1.0, 2.0, 0.4, 3.0, 0.2, 1.5)])
    directions[5] *= -1  # one task that disagrees
    directions /= directions.norm(dim=1, keepdim=True)
    for norms in ([1e-30] * 8, [1e20] * 8, [1e30] * 8,
                  [1e-30, 1.0, 1e20, 1e30, 1e-30, 1.0, 1e20, 1e30]):
        g = (directions * torch.tensor(norms, dtype=torch.float64)[:, None]).float()
        assert torch.isfinite(g).all() and (g != 0).any(1).all()
        a = agreement(g)
        reference = _reference_agreement(g)
        torch.testing.assert_close(a, reference, atol=1e-6, rtol=0, msg=str(norms))
        w = task_weights(g, "cosine", "clip").weights
        torch.testing.assert_close(w, torch.clamp(reference, min=0) / reference.clamp(min=0).sum(),
                                   atol=1e-6, rtol=0)
        assert w[5] == 0.0 and w.max() - w.min() > 0.05  # not the uniform fallback


def test_zero_gradient_agrees_with_nothing():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(40, generator=gen) + 0.5 * torch.randn(5, 40, generator=gen)
    g[2] = 0.0
    a = agreement(g)
    assert a[2] == 0.0
    torch.testing.assert_close(a, _reference_agreement(g), atol=1e-6, rtol=0)
    assert task_weights(g, "cosine", "clip").weights[2] == 0.0


def test_gram_blocks_give_the_unblocked_result(monkeypatch):
    import amfs_dist.algorithms.outer as outer
    g = torch.randn(6, 1000, dtype=torch.float64)
    whole = agreement(g)
    monkeypatch.setattr(outer, "GRAM_CHUNK", 6 * 7)  # blocks of 7 columns, the last of 6
    torch.testing.assert_close(agreement(g), whole)
    torch.testing.assert_close(whole, _reference_agreement(g))


def last_block_learner(tiny, method="amfs"):
    cfg = load_config(None, tiny + [f"method={method}", "outer.agreement=last_block"])
    return cfg, MetaLearner(cfg, (1, 28, 28))


@pytest.mark.parametrize("method", ["amfs", "maml"])
def test_last_block_columns_are_the_last_conv_block_and_the_head(tiny, method):
    _, learner = last_block_learner(tiny, method)
    layout = learner.layout
    expected, start = [], 0
    for name, numel in zip(layout.names, layout.numels):
        # Conv-4: blocks 0..3, then the head's parameters
        if name.startswith(("backbone.blocks.3.", "head.")):
            expected.extend(range(start, start + numel))
        start += numel
    columns = agreement_columns(layout, "last_block")
    assert columns.tolist() == expected
    assert 0 < len(expected) < layout.size
    assert agreement_columns(layout, "all") is None


def test_last_block_weights_equal_a_float64_reference(tiny):
    cfg, learner = last_block_learner(tiny)
    layout = learner.layout
    grads = torch.randn(6, layout.size, generator=torch.Generator().manual_seed(3))
    pieces = dict(zip(layout.names, grads.double().split(layout.numels, dim=1)))
    kept = [n for n in layout.names if n.startswith(("backbone.blocks.3.", "head."))]
    rows = torch.cat([pieces[n] for n in kept], dim=1)
    unit = rows / rows.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    a = (cos.sum(1) - cos.diagonal()) / 5
    reference = a.clamp_min(0) / a.clamp_min(0).sum()
    if reference.sum() == 0:
        reference = torch.full_like(a, 1 / 6)

    trainer = Trainer(cfg, "/nonexistent")  # weigh() needs no run directory
    weights = trainer.weigh(grads).weights
    torch.testing.assert_close(weights, reference, rtol=1e-5, atol=1e-7)
    # and they are not the weights of all the coordinates
    assert not torch.allclose(task_weights(grads, "cosine", "clip").weights, reference)
