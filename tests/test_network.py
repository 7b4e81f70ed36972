"""Exact identities of the decomposed network on tiny float64 models."""
import torch
from torch import nn

from phpn.head import HeadSplit, PostPoolNorm
from phpn.method.network import PrototypeNetwork


def _random_prototypes(weight, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, d = weight.shape
    free = torch.randn(c, k - 1, d, generator=g, dtype=weight.dtype)
    return torch.cat([free, (weight - free.sum(1))[:, None]], dim=1)


def test_maps_average_to_contributions_and_contributions_sum_to_logits(tiny_model):
    model = tiny_model.double()
    split = HeadSplit(backbone=model.features, weight=model.fc.weight.detach(), bias=model.fc.bias.detach())
    prototypes = _random_prototypes(split.weight, k=3)
    net = PrototypeNetwork(split, prototypes, [0, 1, 2, 3], dtype=torch.float64)
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    out = net(x, classes=[1, 3])
    assert out.maps.shape == (5, 2, 3, 8, 8)
    assert out.contributions.shape == (5, 2, 3)
    torch.testing.assert_close(out.maps.mean((3, 4)), out.contributions, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.contributions.sum(-1) + split.bias[[1, 3]], out.logits[:, [1, 3]], rtol=0, atol=1e-12)
    torch.testing.assert_close(out.logits, model(x), rtol=0, atol=1e-12)


def test_undecomposed_classes_keep_their_head_row(tiny_model):
    model = tiny_model.double()
    split = HeadSplit(backbone=model.features, weight=model.fc.weight.detach(), bias=model.fc.bias.detach())
    net = PrototypeNetwork(split, _random_prototypes(split.weight[[2]], k=2), [2], dtype=torch.float64)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(net(x, with_maps=False).logits, model(x), rtol=0, atol=1e-12)


class _NormHead(nn.Module):
    """Features -> mean -> LayerNorm -> linear, like ConvNeXt's head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.GELU())
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 5)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.fc(self.norm(self.features(x).mean((2, 3))))


def test_folding_a_layernorm_after_the_pooling_is_exact():
    model = _NormHead().double().eval()
    g, beta, w, b = model.norm.weight, model.norm.bias, model.fc.weight, model.fc.bias
    u = w * g
    folded_w = (u - u.mean(1, keepdim=True)).detach()
    folded_b = (b + w @ beta).detach()
    split = HeadSplit(backbone=model.features, weight=folded_w, bias=folded_b,
                      post_pool_norm=PostPoolNorm(eps=model.norm.eps), signed_features=True)
    net = PrototypeNetwork(split, _random_prototypes(folded_w, k=3), range(5), dtype=torch.float64)
    x = torch.randn(4, 3, 10, 10, dtype=torch.float64)
    out = net(x)
    torch.testing.assert_close(out.logits, model(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.maps.mean((3, 4)), out.contributions, rtol=0, atol=1e-12)


def test_linearity_of_maps_in_the_prototypes(tiny_model):
    """Attribution axiom: the map of a sum of prototypes is the sum of their maps."""
    model = tiny_model.double()
    split = HeadSplit(backbone=model.features, weight=model.fc.weight.detach(), bias=model.fc.bias.detach())
    protos = _random_prototypes(split.weight, k=3)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    maps = PrototypeNetwork(split, protos, range(4), dtype=torch.float64)(x).maps
    merged = torch.cat([protos[:, :2].sum(1, keepdim=True), protos[:, 2:]], dim=1)
    merged_maps = PrototypeNetwork(split, merged, range(4), dtype=torch.float64)(x).maps
    torch.testing.assert_close(merged_maps[:, :, 0], maps[:, :, :2].sum(2), rtol=0, atol=1e-12)
