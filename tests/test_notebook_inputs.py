"""What a PyTorch user hands the Python API in a notebook: loaders and Subsets, numpy pictures,
HWC and batched tensors, class names, a torchvision transform, and the warnings when the model
cannot read its inputs as given."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import transforms

import phpn
from phpn.errors import ConfigError, DataError
from phpn.method.certify import InputWarning, chance_warning

NAMES = ["red", "green", "blue"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as transforms.Normalize takes them


class ColourNet(nn.Module):
    """Reads normalised images: class c is the image whose channel c is brighter than its mean
    (a 1x1 convolution with a bias of -0.95 keeps only a normalised value above 0.95)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
        self.fc = nn.Linear(3, 3)
        with torch.no_grad():
            self.features[0].weight.copy_(torch.eye(3)[:, :, None, None])
            self.features[0].bias.fill_(-0.95)
            self.fc.weight.copy_(torch.eye(3) + 0.01 * torch.arange(9.0).reshape(3, 3))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def _pictures(n: int = 36, size: int = 12) -> tuple:
    """(uint8 HWC arrays, labels): image i is bright in channel i % 3, with some noise."""
    g = np.random.default_rng(0)
    arrays, labels = [], []
    for i in range(n):
        a = g.uniform(0.05, 0.2, (size, size, 3))
        a[..., i % 3] = g.uniform(0.85, 0.95, (size, size))
        arrays.append((a * 255).round().astype(np.uint8))
        labels.append(i % 3)
    return arrays, labels


class Pictures(Dataset):
    """A torchvision-style dataset: PIL pictures through a transform, ``classes`` and ``targets``."""

    classes = NAMES

    def __init__(self, transform=None):
        self.arrays, self.targets = _pictures()
        self.transform = transform

    def __len__(self):
        return len(self.arrays)

    def __getitem__(self, i):
        image = Image.fromarray(self.arrays[i])
        return (self.transform(image) if self.transform else image), self.targets[i]


NORMALISED = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


@pytest.fixture(scope="module")
def run():
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)  # a model that reads its inputs: no warning
        return phpn.decompose(ColourNet(), DataLoader(Pictures(NORMALISED), batch_size=8), k=2, progress=False)


def test_a_model_that_reads_its_inputs_gets_no_warning_and_keeps_the_datasets_names(run):
    assert run.warnings == [] and run.certificate.accuracy == 1.0 and run.certificate.passed
    assert run.class_names == NAMES
    text = str(run)
    assert text.splitlines()[0] == "phpn run: 3 classes × k = 2 prototypes of module:ColourNet"
    assert "PASSED: agrees with the model on 36 of 36 images" in text and "WARNING" not in text
    assert "tensor(" not in repr(run) and len(repr(run)) < 200
    assert repr(run).startswith("<phpn.Run 3 classes × k = 2 · PASSED · agrees with the model on 36/36 images")


def test_labels_in_another_order_through_a_subset_warn_in_every_form():
    data = Pictures(transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)]))
    data.targets = [(t + 1) % 3 for t in data.targets]  # every label one class off
    part = Subset(data, list(range(30)))
    with pytest.warns(InputWarning) as caught:
        run = phpn.decompose(ColourNet(), DataLoader(part, batch_size=8), k=2, progress=False)
    assert [w.kind for w in run.warnings] == ["chance", "class order"]
    # The chance warning is the very text the command line and the app show.
    assert str(run.warnings[0]) == chance_warning(run.meta["certificate"])
    assert run.warnings[1].message.startswith("The labels look like another class order than the model's: label 0 "
                                              "(red) is read as class 2 (blue) on 5 of 5 images")
    assert [str(w.message) for w in caught] == [str(w) for w in run.warnings]
    assert "WARNING (class order): The labels look like" in str(run)
    assert repr(run).endswith("2 warning(s): chance, class order>")
    assert run.class_names == NAMES  # through the Subset, from the dataset's classes
    # run.certify finds the same on any loader, from the pass it makes anyway.
    with pytest.warns(InputWarning, match=r"another class order.*on 10 of 10 images"):
        cert = run.certify(DataLoader(part, batch_size=8), progress=False)
    assert cert.accuracy == 0.0 and cert.passed


def test_unnormalised_tensors_warn_with_the_numbers():
    with pytest.warns(InputWarning, match="look unnormalised"):
        run = phpn.decompose(ColourNet(), DataLoader(Pictures(transforms.ToTensor()), batch_size=8), k=2,
                             progress=False)
    found = {w.kind: w.message for w in run.warnings}
    assert found["normalisation"] == (
        "The tensors look unnormalised (every value in [0, 1]): the model is right on 5 of 15 sampled images as "
        "given and on 15 with the mean [0.485, 0.456, 0.406] and std [0.229, 0.224, 0.225]. Add "
        "transforms.Normalize(mean, std) (the model's own) to the dataset's transform.")


def test_explain_takes_numpy_hwc_batches_and_class_names(run):
    arrays, labels = _pictures()
    x = torch.stack([NORMALISED(Image.fromarray(a)) for a in arrays[:4]])
    one = run.explain(x[1])
    assert one.class_name == "green" and one.class_index == 1
    # HWC tensor (as matplotlib holds it), the same numbers.
    assert run.explain(x[1].permute(1, 2, 0)).logit == pytest.approx(one.logit, abs=1e-6)
    # A float numpy array, CHW.
    assert run.explain(x[1].numpy()).logit == pytest.approx(one.logit, abs=1e-6)
    # A batch gives a list, in order.
    batch = run.explain(x)
    assert isinstance(batch, list) and [e.class_name for e in batch] == ["red", "green", "blue", "red"]
    assert batch[1].logit == pytest.approx(one.logit, abs=1e-6)
    # A class by name, or by index.
    assert run.explain(x[1], "blue").class_index == 2
    assert run.explain(x[1], class_index=np.int64(2)).class_name == "blue"
    with pytest.raises(ConfigError, match="Unknown class 'purple'"):
        run.explain(x[1], "purple")
    # A tensor whose channels fit nothing: the fix in one line.
    with pytest.raises(DataError, match=r"the model takes 3 channels \(input \(3, 12, 12\)\)"):
        run.explain(torch.zeros(5, 12, 12))
    # An 8-bit picture goes through the dataset's own transform (the tensors alone would not say how).
    assert run.explain(arrays[1]).logit == pytest.approx(one.logit, abs=1e-6)
    with pytest.raises(DataError, match="cannot read as an image"):
        run.explain({"image": 1})


def test_a_torchvision_transform_is_the_preprocessing_applied_as_given():
    data = Pictures()  # PIL pictures: phpn applies the transform
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        run = phpn.decompose(ColourNet(), data, k=2, preprocess=NORMALISED, progress=False,
                             class_names=["R", "G", "B"])
    assert run.certificate.accuracy == 1.0 and run.class_names == ["R", "G", "B"]
    recorded = run.meta["preprocess"]
    assert recorded["given"] == "a transform" and recorded["size"] == [12, 12]
    assert "Normalize(mean=(0.485, 0.456, 0.406)" in recorded["transform"]
    arrays, _ = _pictures()
    from_numpy = run.explain(arrays[2])  # an 8-bit HWC picture, through the transform
    from_pil = run.explain(Image.fromarray(arrays[2]))
    assert from_numpy.class_name == "B" and from_numpy.logit == pytest.approx(from_pil.logit, abs=1e-6)
    assert from_numpy.image.size == (12, 12)
    # The picture shown is the transform's output un-normalised: the image itself, to 8-bit rounding.
    assert np.abs(np.asarray(from_numpy.image, dtype=int) - arrays[2].astype(int)).max() <= 1


def test_keyword_typos_name_the_keyword(run):
    with pytest.raises(ConfigError, match=r"phpn.decompose has no keyword argument 'preprocss' \(did you mean "
                                          r"'preprocess'\?\)"):
        phpn.decompose(ColourNet(), Pictures(), preprocss=NORMALISED)
    with pytest.raises(ConfigError, match="preprocess must be a phpn.Preprocess, a dict of its fields or a torchvision"):
        phpn.decompose(ColourNet(), Pictures(), preprocess=3)
    with pytest.raises(ConfigError, match="not a .channels, height, width. tensor.*ToTensor"):
        phpn.decompose(ColourNet(), Pictures(), preprocess=transforms.Resize(12))


def test_certify_makes_one_forward_per_batch(run):
    loader = DataLoader(TensorDataset(*_normalised_tensors()), batch_size=7)
    calls = []
    handle = run.session.loaded.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        cert = run.certify(loader, progress=False)
    finally:
        handle.remove()
    assert cert.images == 36 and cert.passed and cert.accuracy == 1.0
    assert len(calls) == len(loader)  # the features are caught on the model's own pass


def _normalised_tensors():
    arrays, labels = _pictures()
    return torch.stack([NORMALISED(Image.fromarray(a)) for a in arrays]), torch.tensor(labels)


def test_an_explanation_prints_as_one_line(run):
    x, _ = _normalised_tensors()
    ex = run.explain(x[2])
    text = repr(ex)
    assert "\n" not in text and "array" not in text and len(text) < 200
    parts = " + ".join(f"{c:.3g}" for c in ex.contributions)
    assert text == (f"<Explanation: blue (class 2), logit {ex.logit:.4g} = bias {ex.bias:.3g} + {parts} "
                    f"(2 prototypes, maps 12x12)>")
    assert str(ex) == text


def test_errors_in_python_name_keywords_not_flags():
    from phpn.api import in_python_terms

    assert in_python_terms("Use --device cpu (or auto).") == "Use device='cpu' (or auto)."
    assert in_python_terms("Lower --batch-size or --memory-budget.") == "Lower batch_size= or memory_budget_mb=."
    assert in_python_terms("Pass --k 3 or --classes 0,5-9.") == "Pass k=3 or classes=0,5-9."
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError) as caught:
            phpn.decompose(ColourNet(), DataLoader(Pictures(NORMALISED), batch_size=8), k=2, device="cuda",
                           progress=False)
        assert "--" not in str(caught.value) and "device='cpu'" in str(caught.value)


def test_random_split_keeps_the_datasets_names_and_the_images_they_hold():
    """``random_split`` (a Subset of a Subset here) hands the names through, in the explanations too."""
    train, held_out = torch.utils.data.random_split(Pictures(NORMALISED), [24, 12],
                                                    generator=torch.Generator().manual_seed(0))
    inner = torch.utils.data.random_split(train, [18, 6], generator=torch.Generator().manual_seed(1))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        run = phpn.decompose(ColourNet(), DataLoader(inner, batch_size=8), k=2, progress=False)
    assert run.class_names == NAMES
    assert run.meta["certificate"]["images"] == 18  # the split's images, not the whole dataset's
    image, label = held_out[0]
    explanation = run.explain(image)
    assert explanation.class_name == NAMES[label] and explanation.class_index == label
    assert repr(explanation).startswith(f"<Explanation: {NAMES[label]} (class {label}), logit ")


def test_the_datasets_own_transform_reads_pictures_when_no_preprocess_is_given():
    data = Pictures(NORMALISED)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        run = phpn.decompose(ColourNet(), DataLoader(Subset(data, list(range(30))), batch_size=8), k=2,
                             progress=False)
    recorded = run.meta["preprocess"]
    assert recorded["given"] == "a transform" and recorded["size"] == [12, 12]
    assert "Normalize(mean=(0.485, 0.456, 0.406)" in recorded["transform"]
    picture = data.arrays[2]  # an 8-bit HWC numpy picture, read as the dataset reads it
    assert run.explain(picture).logit == pytest.approx(run.explain(data[2][0]).logit, abs=1e-6)
    # An augmenting transform would read a picture differently on every call: not taken.
    augmenting = Pictures(transforms.Compose([transforms.RandomHorizontalFlip(), NORMALISED]))
    run = phpn.decompose(ColourNet(), DataLoader(augmenting, batch_size=8), k=2, progress=False)
    assert run.meta["preprocess"]["given"] == "preprocessed tensors"
    with pytest.raises(ConfigError, match="given as preprocessed tensors"):
        run.explain(picture)
