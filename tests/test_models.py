"""Backbones: the architectures of the papers they come from, and support-set batch norm."""
import torch

from amfs_dist.models.backbones import MLP, Conv4, ResNet12, SupportBatchNorm, feature_dim


def test_conv4_feature_sizes():
    assert feature_dim(Conv4(1, 64), (1, 28, 28)) == 64       # Omniglot, ProtoNets width
    assert feature_dim(Conv4(3, 32), (3, 84, 84)) == 32 * 5 * 5  # mini-ImageNet, MAML width


def test_resnet12_is_metaoptnets():
    net = ResNet12(3, 64)
    assert [b.convs[0].out_channels for b in net.blocks] == [64, 160, 320, 640]
    n_params = sum(p.numel() for p in net.parameters())
    assert 12.0e6 < n_params < 12.6e6  # MetaOptNet's ResNet-12: ~12.4M
    assert feature_dim(net, (3, 84, 84)) == 640 * 5 * 5


def test_mlp_is_mamls_regression_body():
    assert feature_dim(MLP(1, 40), (1,)) == 40


def test_support_batch_norm_uses_the_leading_rows_only():
    bn = SupportBatchNorm(3).double()
    x = torch.randn(10, 3, 4, 4, dtype=torch.float64)
    out = bn(x, n_stats=4)
    ref = x[:4]
    mean = ref.mean((0, 2, 3), keepdim=True)
    var = ref.var((0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(out, (x - mean) / torch.sqrt(var + bn.eps))
    changed = x.clone()
    changed[4:] = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 10
    torch.testing.assert_close(bn(changed, 4)[:4], out[:4])
    assert torch.autograd.gradcheck(lambda t: bn(t, 4), (x[:6].clone().requires_grad_(),))
