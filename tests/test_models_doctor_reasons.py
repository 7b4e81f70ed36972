"""The doctor's reasons for timm families whose heads are not one pooling + one linear layer:
VGG's 1x1 feature map, LeViT's two averaged heads (folded), distilled DeiT's two tokens,
MobileNetV4's MLP head; and discovery refusing a feature map with too few positions."""
import pytest
import torch
from torch import nn

from phpn import config as D
from phpn.errors import ConfigError
from phpn.head import HeadSplit
from phpn.images.folders import scan_image_folder
from phpn.models import diagnose
from phpn.models.doctor import feature_positions_problem
from phpn.pipeline.discover import DiscoveryConfig, discover

timm = pytest.importorskip("timm")

ONE_POSITION = ("The feature map ('{layer}') is 1x1 at this input size: every image is one position, so the "
                "prototypes say what the model looks for but their where-maps cannot point anywhere in the image (a "
                "CIFAR ResNet at 32 px, or timm's VGG, whose last convolution covers the whole 7x7 map). For "
                "where-maps, use a larger input if the model works at one (its feature map grows with the crop), or "
                "a model whose last feature map keeps a grid of positions.")


class WholeImageConv(nn.Module):
    """A convolution over the whole 8x8 input, then mean + linear: exact, but one position per image."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 8), nn.ReLU())
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def _timm(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()


def test_one_position_per_image_is_exact_with_a_caution():
    model = WholeImageConv().eval()
    d = diagnose(model, (3, 8, 8))
    assert d.verdict == "exact" and d.feature_shape == (6, 1, 1)
    assert d.notes[0] == ONE_POSITION.format(layer="features")
    bigger = diagnose(model, (3, 16, 16))  # a 9x9 grid at a larger input
    assert bigger.verdict == "exact" and not any("1x1" in n for n in bigger.notes)
    assert D.MIN_POSITIONS_PER_IMAGE == 2


def test_too_few_feature_vectors_for_k_name_the_class():
    err = feature_positions_problem((8, 2, 2), k=5, class_images={"cat": 1, "dog": 10})
    assert isinstance(err, ConfigError)
    assert err.problem == ("Class 'cat' has 1 image x 4 positions = 4 feature vectors, fewer than the 5 parts asked: "
                           "NMF cannot find 5 parts in them.")
    assert err.fix == "Lower k or add images to that class."
    assert feature_positions_problem((8, 2, 2), k=4, class_images={"cat": 1}) is None


def test_discovery_refuses_too_few_feature_vectors_before_any_work(image_folder, tiny_loaded):
    """A 1x1 map with 2 images in a class holds 2 feature vectors: k = 3 cannot be found in them."""
    model = WholeImageConv().eval()
    split = HeadSplit(backbone=model.features, weight=model.fc.weight.detach(), bias=model.fc.bias.detach(),
                      feature_layer="features", head_layer="fc")
    pre = type(tiny_loaded.preprocess)(resize=8, crop=8, mean=(0.5,) * 3, std=(0.25,) * 3)
    data = scan_image_folder(image_folder, num_classes=4, images_per_class=2)
    stages = []
    with pytest.raises(ConfigError) as info:
        discover(tiny_loaded, split, data, pre, DiscoveryConfig(k=3, device="cpu"),
                 progress=lambda stage, *a, **k: stages.append(stage))
    assert info.value.problem.endswith("has 2 images x 1 positions = 2 feature vectors, fewer than the 3 parts "
                                       "asked: NMF cannot find 3 parts in them.")
    assert stages == []  # not one batch of features was computed


@pytest.mark.slow
def test_timm_vgg_has_a_one_by_one_feature_map():
    d = diagnose(_timm("vgg11"), (3, 32, 32))
    assert d.verdict == "exact" and d.feature_shape == (4096, 1, 1)
    assert d.notes[0] == ONE_POSITION.format(layer="pre_logits")


def test_levit_folds_its_two_averaged_heads_exactly():
    model = _timm("levit_128s", img_size=128)
    with torch.no_grad():  # give the BatchNorms real statistics, so folding them matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 1.5)
    d = diagnose(model, (3, 128, 128))
    assert d.verdict == "exact-after-folding" and d.feature_shape == (384, 2, 2)
    assert d.reason.startswith("The layers after the pooling (div by 2, then 'head + head_dist') are all affine and "
                               "fold into one linear head")
    assert ("the heads 'head' and 'head_dist' read the same pooled features and their outputs are added: one affine "
            "map, folded into one head") in d.notes

    def folded(norm_linear):
        bn, lin = norm_linear.bn, norm_linear.linear
        a = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        shift = bn.bias.double() - a * bn.running_mean.double()
        return lin.weight.double() * a, lin.weight.double() @ shift + lin.bias.double()

    (w1, b1), (w2, b2) = folded(model.head), folded(model.head_dist)
    assert torch.allclose(d.split.weight.double(), (w1 + w2) / 2, atol=1e-6)
    assert torch.allclose(d.split.bias.double(), (b1 + b2) / 2, atol=1e-6)
    verified = [n for n in d.notes if n.startswith("verified on a random 3x128x128 input")]
    assert verified and "in float64" in verified[0]


def test_distilled_deit_names_its_two_tokens():
    d = diagnose(_timm("deit_tiny_distilled_patch16_224", img_size=32), (3, 32, 32))
    assert d.verdict == "impossible" and d.split is None
    assert d.reason == (
        "The model adds up two heads that read different tokens: 'head' reads [:, 0] (the class token) and "
        "'head_dist' reads [:, 1] (the distillation token of a distilled DeiT). Neither averages over positions, so "
        "the logit is not a sum of per-position contributions, and 'head' alone is not the model (it drops half of "
        "each logit).")
    assert d.notes[-1] == ("use a ViT or DeiT trained with global average pooling (timm's global_pool='avg') instead "
                           "of class and distillation tokens")


def test_mobilenetv4_gets_the_mlp_head_reason():
    d = diagnose(_timm("mobilenetv4_conv_small"), (3, 64, 64))
    assert d.verdict == "impossible"
    assert d.reason.startswith("After the global pooling (AdaptiveAvgPool2d 'global_pool.pool') the model applies an "
                               "MLP head: ")
    assert ("BatchNormAct2d 'norm_head' (with its ReLU) is non-linear, so the logit is not a linear function of the "
            "pooled features") in d.reason
