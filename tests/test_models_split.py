"""Cutting models into backbone + affine head: every pooling style, folding, refusals, fallbacks."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from phpn.errors import ConfigError, NotDecomposableError
from phpn.models import split_head
from phpn.models.zoo import build_model


def relative_error(a, b):
    return float((a - b).abs().max() / b.abs().max())


def assert_exact(model, size=32, tol=1e-10, **kwargs):
    """Split a float64 copy and compare with the model on a fresh input; returns the split."""
    model = model.double().eval()
    split = split_head(model, example_input=torch.randn(2, 3, size, size, dtype=torch.float64), **kwargs)
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        feats = split.backbone(x)
        assert feats.ndim == 4 and feats.shape[1] == split.num_features
        assert relative_error(split.logits_from_features(feats), model(x)) < tol
    return split


class Body(nn.Module):
    """32x32 -> (B, 8, 8, 8), ending in ReLU."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.bn(self.conv1(x)))))


class PoolModule(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.body, self.pool = Body(), nn.AdaptiveAvgPool2d(1)
        self.drop, self.fc = nn.Dropout(0.5), nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.drop(torch.flatten(self.pool(self.body(x)), 1)))


class MeanPool(PoolModule):
    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


class AvgPoolFullMap(PoolModule):
    def forward(self, x):  # kernel 8 = the whole map for 32x32 inputs
        return self.fc(F.dropout(F.avg_pool2d(self.body(x), 8), 0.3, self.training).flatten(1))


class AdaptiveView(PoolModule):
    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.body(x), 1)
        return self.fc(x.view(x.size(0), -1))


class ViewMean(PoolModule):
    def forward(self, x):
        x = self.body(x)
        return self.fc(x.view(x.size(0), x.size(1), -1).mean(-1))


class TwoMeans(PoolModule):
    def forward(self, x):
        return self.fc(self.body(x).mean(3).mean(2))


class ChannelsLast(PoolModule):
    def forward(self, x):  # timm-style NHWC features
        return self.fc(self.body(x).permute(0, 2, 3, 1).mean(dim=(1, 2)))


class Tokens(PoolModule):
    def forward(self, x):  # (B, N, D) tokens, mean-pooled: a ViT with global average pooling
        return self.fc(self.body(x).flatten(2).transpose(1, 2).mean(1))


class Conv1x1Head(PoolModule):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return self.head(self.pool(self.body(x))).flatten(1)


class HeadInCustomModule(nn.Module):
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(self.pool(x).flatten(1)) / 2.0  # a temperature

    def __init__(self):
        super().__init__()
        self.body, self.head = Body(), self.Head()

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("cls", [PoolModule, MeanPool, AvgPoolFullMap, AdaptiveView, ViewMean, TwoMeans])
def test_every_pooling_style_splits_exactly(cls):
    torch.manual_seed(0)
    model = cls()
    split = assert_exact(model)
    assert torch.equal(split.weight, model.fc.weight.detach()) and torch.equal(split.bias, model.fc.bias.detach())
    assert split.head_layer == "fc" and not split.folded and not split.folded_layers
    assert split.signed_features is False  # F.relu before the pooling
    assert any(n.startswith("verified on a random") for n in split.notes)


def test_dropout_is_noted_as_identity():
    split = assert_exact(PoolModule())
    assert any("'drop': dropout is the identity at inference" in n for n in split.notes)


@pytest.mark.parametrize("cls,layout", [(ChannelsLast, "NHWC"), (Tokens, "NLD")])
def test_other_layouts_come_back_channels_first(cls, layout):
    torch.manual_seed(0)
    split = assert_exact(cls())
    with torch.no_grad():
        assert tuple(split.backbone(torch.randn(1, 3, 32, 32, dtype=torch.float64)).shape) == (1, 8, 8, 8)
    assert any(layout in n for n in split.notes)


def test_conv1x1_head_and_custom_head_module():
    torch.manual_seed(0)
    assert_exact(Conv1x1Head())
    model = HeadInCustomModule()
    split = assert_exact(model)
    assert split.head_layer == "head.fc" and split.folded_layers == ["div by 2"]
    assert torch.allclose(split.weight, model.head.fc.weight.detach() / 2)


def test_in_place_activation_whose_result_is_unused():
    class InPlace(PoolModule):
        def forward(self, x):
            feats = self.body.conv2(F.relu(self.body.bn(self.body.conv1(x))))
            feats.relu_()  # the return value is dropped; the mutation is what counts
            return self.fc(feats.mean((2, 3)))

    torch.manual_seed(0)
    split = assert_exact(InPlace())
    assert split.signed_features is False


def test_float32_split_is_within_float32_rounding():
    torch.manual_seed(0)
    model = PoolModule().eval()
    split = split_head(model, example_input=torch.randn(2, 3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(split.logits_from_features(split.backbone(x)), model(x)) < 1e-5
    assert split.weight.dtype == torch.float32


def test_avg_pool_that_does_not_cover_the_map_is_refused():
    class PartialAvgPool(PoolModule):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8 * 2 * 2, 5)

        def forward(self, x):  # kernel 4 on the 8x8 map leaves a 2x2 grid, each cell read separately
            return self.fc(F.avg_pool2d(self.body(x), 4).flatten(1))

    with pytest.raises(NotDecomposableError, match=r"no global average pooling.*avg_pool2d keeps a 2x2 grid"):
        split_head(PartialAvgPool().eval(), example_input=torch.randn(2, 3, 32, 32))


def test_max_pooling_is_refused():
    class MaxPool(PoolModule):
        def forward(self, x):
            return self.fc(F.adaptive_max_pool2d(self.body(x), 1).flatten(1))

    with pytest.raises(NotDecomposableError, match=r"pools with a maximum .*not a mean"):
        split_head(MaxPool().eval(), example_input=torch.randn(2, 3, 32, 32))


def test_mlp_after_pooling_is_refused_with_what_was_found():
    class MLPHead(PoolModule):
        def __init__(self):
            super().__init__()
            self.hidden = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(torch.tanh(self.hidden(self.body(x).mean((2, 3)))))

    with pytest.raises(NotDecomposableError) as err:
        split_head(MLPHead().eval(), example_input=torch.randn(2, 3, 32, 32))
    assert "an MLP head: Linear 'hidden' -> tanh -> Linear 'fc'" in str(err.value)
    assert "non-linear" in str(err.value)


def test_affine_layers_after_pooling_fold():
    class BNHead(PoolModule):
        def __init__(self):
            super().__init__()
            self.bn1d, self.hidden = nn.BatchNorm1d(8), nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.hidden(self.bn1d(self.body(x).mean((2, 3)))))

    torch.manual_seed(0)
    model = BNHead()
    with torch.no_grad():  # non-trivial running statistics
        model.bn1d.running_mean.uniform_(-1, 1)
        model.bn1d.running_var.uniform_(0.5, 2)
    split = assert_exact(model)
    assert split.folded_layers == ["bn1d", "hidden"] and split.head_layer == "fc" and not split.folded


def test_layernorm_after_pooling_folds_with_a_per_image_scale():
    class LNHead(PoolModule):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            return self.fc(self.norm(self.body(x).mean((2, 3))))

    torch.manual_seed(0)
    model = LNHead()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 2)
        model.norm.bias.uniform_(-1, 1)
    split = assert_exact(model)
    assert split.folded and split.post_pool_norm.eps == model.norm.eps
    g, v, beta = model.norm.weight.detach(), model.fc.weight.detach(), model.norm.bias.detach()
    expected = g * v - (g * v).mean(dim=1, keepdim=True)
    assert torch.allclose(split.weight, expected, atol=1e-12)
    assert torch.allclose(split.bias, model.fc.bias.detach() + v @ beta, atol=1e-12)


@pytest.mark.slow
def test_convnext_layernorm2d_folds_exactly():
    torch.manual_seed(0)
    model = build_model("convnext_tiny", 4)
    with torch.no_grad():  # make the folded LayerNorm's affine part non-trivial
        model.classifier[0].weight.uniform_(0.5, 2)
        model.classifier[0].bias.uniform_(-1, 1)
    split = assert_exact(model, size=64)
    assert split.folded and split.folded_layers == ["classifier.0"] and split.head_layer == "classifier.2"
    assert split.signed_features and split.feature_layer == "features"


def test_swin_backbone_returns_channels_first():
    model = build_model("swin_t", 3).eval()
    split = split_head(model, example_input=torch.randn(2, 3, 64, 64))
    with torch.no_grad():
        feats = split.backbone(torch.randn(1, 3, 64, 64))
    assert tuple(feats.shape) == (1, 768, 2, 2)
    assert split.signed_features and any("LayerNorm 'norm'" in n for n in split.notes)


@pytest.mark.parametrize("arch,feature_layer,signed", [
    ("resnet18", "layer4", False),
    ("densenet121", "relu after 'features.norm5'", False),
    ("mobilenet_v2", "features", False),
    ("regnet_y_400mf", "trunk_output", False),
    ("efficientnet_b0", "features", True),
])
def test_torchvision_cnns_split_exactly(arch, feature_layer, signed):
    torch.manual_seed(0)
    split = assert_exact(build_model(arch, 3), size=64)
    assert split.feature_layer == feature_layer and split.signed_features is signed
    if arch == "efficientnet_b0":
        assert any("SiLU" in n and "dips slightly below zero" in n for n in split.notes)


def test_untraceable_model_falls_back_to_hooks():
    class DataDependent(PoolModule):
        def forward(self, x):
            feats = self.body(x)
            if feats.sum() > -1:  # control flow on values: torch.fx cannot trace this
                feats = feats * 1
            return self.fc(self.pool(feats).flatten(1))

    torch.manual_seed(0)
    split = assert_exact(DataDependent())
    assert split.feature_layer == "body" and split.head_layer == "fc"
    assert any("found with forward hooks" in n for n in split.notes)


def test_user_named_layers_and_bad_names():
    torch.manual_seed(0)
    model = build_model("resnet18", 3)
    split = assert_exact(model, size=64, feature_layer="layer4", head_layer="fc")
    assert split.feature_layer == "layer4"
    with pytest.raises(ConfigError, match=r"no layer named 'layer5' \(--feature-layer\)"):
        split_head(model, feature_layer="layer5", example_input=torch.randn(1, 3, 64, 64, dtype=torch.float64))
    with pytest.raises(NotDecomposableError, match="does not reproduce the logits"):
        split_head(model, feature_layer="layer3", example_input=torch.randn(1, 3, 64, 64, dtype=torch.float64))


def test_model_returning_a_tuple_is_refused():
    class Pair(PoolModule):
        def forward(self, x):
            feats = self.body(x)
            return self.fc(feats.mean((2, 3))), feats

    with pytest.raises(NotDecomposableError, match="returns tuple, not a .batch, classes. tensor of logits"):
        split_head(Pair().eval(), example_input=torch.randn(1, 3, 32, 32))


def test_input_the_model_cannot_take_is_a_config_error():
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                                 hidden_dim=16, mlp_dim=16, num_classes=3)
    with pytest.raises(ConfigError, match=r"fails on an input of shape \(1, 3, 64, 64\)"):
        split_head(model, example_input=torch.randn(1, 3, 64, 64))
