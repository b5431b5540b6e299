"""O-AMFS weighting (DESIGN 1.2)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amfs_dist.algorithms.outer import agreement, combine, task_weights


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
