"""The Python API: a model object and images held in memory -> decompose -> certify -> explain."""
from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import phpn
from phpn import api
from phpn import config as defaults
from phpn.errors import ConfigError, DataError, PhpnError


class UserNet(nn.Module):
    """A model as a user writes it: its own names, pooling inside forward."""

    def __init__(self, classes: int = 4, channels: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1),
                                  nn.ReLU())
        self.classifier = nn.Linear(12, classes)

    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.body(x), 1), 1))


@pytest.fixture
def user_model():
    torch.manual_seed(0)
    return UserNet()


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, 10, 10, generator=g)
    y = torch.arange(40) % 4
    return x, y


@pytest.fixture
def loader(tensors):
    return DataLoader(TensorDataset(*tensors), batch_size=8)


def test_decompose_a_live_model_from_a_dataloader_is_exact(user_model, loader, tensors):
    run = phpn.decompose(user_model, loader, k=2, progress=False)
    assert isinstance(run, phpn.Run) and run.k == 2
    assert sorted(run.class_indices.tolist()) == [0, 1, 2, 3]
    # The prototypes of each class sum to its head row (float64), so the logits are the model's.
    head = user_model.classifier.weight.detach().double()
    assert torch.allclose(run.prototypes.sum(1), head[run.class_indices], atol=1e-6)
    assert run.certificate.images == 40 and run.certificate.top1_agreement == 1.0 and run.certificate.passed
    assert [c.index for c in run.classes] == run.class_indices.tolist()
    assert all(len(c.mean_contribution) == 2 and c.images == 10 for c in run.classes)
    cert = run.certify(loader)
    assert isinstance(cert, phpn.Certificate)
    assert cert.images == 40 and cert.top1_agreement == 1.0 and cert.passed
    with torch.no_grad():
        logits = user_model(tensors[0])
        ours = run.network()(tensors[0], with_maps=False).logits
    assert (logits - ours).abs().max().item() <= 1e-4 * logits.abs().max().item()
    # The model itself is untouched: same weights, same outputs.
    assert torch.equal(user_model.classifier.weight.detach().double(), head)


def test_images_per_class_caps_the_discovery_set(user_model, loader):
    run = phpn.decompose(user_model, loader, k=2, images_per_class=3, progress=False)
    assert [c["images"] for c in run.meta["classes"]] == [3, 3, 3, 3]
    assert run.certificate.images == 12


def test_a_dataset_of_pil_images_with_a_preprocess_spec(user_model, tmp_path):
    rng = np.random.default_rng(0)
    items = [(Image.fromarray(rng.integers(0, 255, (14, 18, 3), dtype=np.uint8)), i % 4) for i in range(16)]
    pre = {"resize": 12, "crop": 12, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    run = phpn.decompose(user_model, items, k=2, preprocess=pre, progress=False)
    assert run.certificate.top1_agreement == 1.0 and run.certificate.images == 16
    assert run.meta["preprocess"]["crop"] == 12
    ex = run.explain(items[0][0])
    assert ex.image.size == (12, 12)
    assert ex.logit == pytest.approx(float(ex.contributions.sum() + ex.bias), abs=1e-5)
    # Reopened on the live model, the run brings its own preprocessing back.
    again = phpn.load_run(run.save(tmp_path / "run"), user_model)
    assert again.session.preprocess.crop == 12 and again.session.diagnosis.input_size == (3, 12, 12)
    assert again.explain(items[0][0]).logit == pytest.approx(ex.logit, abs=1e-6)


def test_a_demo_run_opens_with_its_model():
    from phpn.demos import get_demo

    demo = get_demo("fashion-mnist")
    run = phpn.load_run(demo.run_dir)
    assert run.session.demo == "fashion-mnist" and run.session.preprocess.crop == 28
    assert run.certificate.passed and len(run.classes) == 10 and run.classes[0].name == "T-shirt/top"
    image = sorted((demo.explain_dir() / "07_sneaker").iterdir())[0]
    ex = run.explain(image)
    assert ex.source == image.name and ex.image_root == demo.discovery_dir()
    assert [c.size for c in ex.patch_pictures(1, count=3)] == [(96, 96)] * 3


def test_pictures_without_preprocessing_are_refused_with_the_fix(user_model, image_folder):
    items = [(Image.new("RGB", (12, 12)), 0)]
    with pytest.raises(ConfigError, match="does not know how to preprocess them for this model. Pass preprocess="):
        phpn.decompose(user_model, items, progress=False)
    with pytest.raises(ConfigError, match="does not know how to preprocess"):
        phpn.decompose(user_model, image_folder, progress=False)
    # With a spec, a folder works as well as objects.
    run = phpn.decompose(user_model, image_folder, k=2, progress=False,
                         preprocess={"resize": 16, "crop": 16, "mean": [0.5] * 3, "std": [0.25] * 3})
    assert run.certificate.images == 48 and run.certificate.passed
    assert run.explain(image_folder / "1" / "img03.png").image.size == (16, 16)


def test_labels_must_be_the_models_classes(user_model):
    data = TensorDataset(torch.zeros(2, 3, 8, 8), torch.tensor([0, 7]))
    with pytest.raises(DataError, match="label 7 is not a class of the model"):
        phpn.decompose(user_model, data, progress=False)


def test_a_dataloader_too_large_to_hold_asks_for_a_cap(loader):
    from phpn.images.inputs import from_loader

    with pytest.raises(DataError, match="more than 0 GiB of memory.*Pass images_per_class=N"):
        from_loader(loader, num_classes=4, max_bytes=5 * 3 * 10 * 10 * 4)
    data = from_loader(loader, num_classes=4, images_per_class=1, max_bytes=5 * 3 * 10 * 10 * 4)
    assert [len(c.paths) for c in data.classes] == [1, 1, 1, 1]


def test_unknown_option_names_the_allowed_ones(user_model, loader):
    with pytest.raises(ConfigError, match="Unknown discovery option.*solverr"):
        phpn.decompose(user_model, loader, solverr="lbfgs", progress=False)


def test_explain_a_tensor_renders_a_self_contained_page_and_a_picture(user_model, loader, tensors, tmp_path):
    run = phpn.decompose(user_model, loader, k=3, progress=False)
    ex = run.explain(tensors[0][5])
    assert isinstance(ex, phpn.Explanation)
    with torch.no_grad():
        logits = user_model(tensors[0][5:6])[0]
    assert ex.class_index == int(logits.argmax())
    assert ex.logit == pytest.approx(float(logits.max()), abs=1e-5)
    assert float(ex.contributions.sum() + ex.bias) == pytest.approx(ex.logit, abs=1e-5)
    assert ex.maps.shape == (3, 10, 10)
    assert np.allclose(ex.maps.mean((1, 2)), ex.contributions, atol=1e-6)
    # What each prototype looks for: its top training patches, as records and as pictures.
    assert len(ex.top_patches) == 3 and all(len(p) == run.meta["config"]["top_patches"] for p in ex.top_patches)
    crops = ex.patch_pictures(0, count=2, size=48)
    assert len(crops) == 2 and crops[0].size == (48, 48)

    inline = ex._repr_html_()
    assert inline.startswith('<div class="phpn-explanation"><style>') and inline.endswith("</div>")
    assert "body{" not in inline and ".phpn-explanation h1{" in inline  # the notebook's own styles stay
    assert len(re.findall(r"data:image/png;base64,", inline)) >= 7 and "<script" not in inline
    inner = ex.to_html()
    assert "<script" not in inner and "http://" not in inner and "https://" not in inner
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", inner)
    assert len(pngs) >= 4 + 3 + 3  # picture, overlays, class map, per prototype its map and its top patches
    Image.open(__import__("io").BytesIO(base64.b64decode(pngs[0]))).verify()

    png, page_file = ex.save(tmp_path / "x.png"), ex.save(tmp_path / "x.html")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width >= 3 * 224
    assert page_file.read_text(encoding="utf-8") == inner or "Why" in page_file.read_text(encoding="utf-8")
    with pytest.raises(ConfigError, match="Use a file name ending in .png or .html"):
        ex.save(tmp_path / "x.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.html", "x.png"]  # no temporary files left


def test_explain_another_class(user_model, loader, tensors):
    run = phpn.decompose(user_model, loader, k=2, progress=False)
    ex = run.explain(tensors[0][0], class_index=2)
    assert ex.class_index == 2 and ex.class_name == "2"
    with torch.no_grad():
        assert ex.logit == pytest.approx(float(user_model(tensors[0][:1])[0, 2]), abs=1e-5)


def test_save_and_load_run_attached_to_the_model(user_model, loader, tensors, tmp_path):
    run = phpn.decompose(user_model, loader, k=2, progress=False)
    path = run.save(tmp_path / "run")
    again = phpn.load_run(path, user_model)
    assert torch.equal(again.prototypes, run.prototypes)
    assert again.certify(TensorDataset(*tensors)).top1_agreement == 1.0
    # Without a model: readable, not explainable.
    bare = phpn.load_run(path)
    assert bare.k == 2
    with pytest.raises(ConfigError, match="not attached to a model"):
        bare.explain(tensors[0][0])
    # Another model's weights are refused.
    torch.manual_seed(5)
    with pytest.raises(PhpnError, match="different checkpoint|weights differ"):
        phpn.load_run(path, UserNet())


def test_open_model_runs_the_doctor_on_a_live_module(user_model):
    session = phpn.open_model(user_model, input_size=(3, 16, 16))
    assert session.diagnosis.verdict == "exact"
    assert session.diagnosis.input_size == (3, 16, 16)
    assert session.loaded.num_classes == 4 and session.class_names == ["0", "1", "2", "3"]
    with pytest.raises(ConfigError, match="not a \\(1, classes\\) tensor"):
        phpn.open_model(nn.Conv2d(3, 3, 1))


def test_overrides_reach_the_doctor():
    # One load, one trace: the doctor sees the overridden input size.
    session = phpn.open_model(demo="fashion-mnist", overrides={"resize": 56, "crop": 56})
    assert session.diagnosis.input_size == (1, 56, 56)
    assert session.preprocess.crop == 56 and session.preprocess.resize == 56
    assert tuple(session.diagnosis.feature_shape[1:]) == (14, 14)


def test_merge_preprocess_rules():
    base = phpn.Preprocess(resize=256, crop=224)
    assert phpn.merge_preprocess(base, {"crop": 300}).resize == 343  # the crop keeps the 256/224 ratio
    assert phpn.merge_preprocess(base, {"crop": 200}).resize == 229
    grey = phpn.merge_preprocess(base, {"channels": 1})
    assert grey.mean == (0.5,) and grey.std == (0.25,)
    assert phpn.merge_preprocess(base, {"resize": None}) is base
    with pytest.raises(ConfigError, match="Unknown preprocessing setting"):
        phpn.merge_preprocess(base, {"size": 3})


def test_fashion_mnist_model_from_a_users_own_dataloader():
    """The demo's trained CNN as a plain module, with a torchvision DataLoader the user built."""
    from torchvision import datasets, transforms

    from phpn.demos import get_demo

    demo = get_demo("fashion-mnist")
    model = demo.load_model().model  # a plain nn.Module from here on
    norm = demo.load_model().preprocess
    tf = transforms.Compose([transforms.Grayscale(), transforms.ToTensor(), transforms.Normalize(norm.mean, norm.std)])
    folder = datasets.ImageFolder(str(demo.discovery_dir()), transform=tf)
    per_class = {}
    keep = [i for i, (_, y) in enumerate(folder.samples) if per_class.setdefault(y, []).append(i) or
            len(per_class[y]) <= 8]
    loader = DataLoader(Subset(folder, keep), batch_size=32)
    run = phpn.decompose(model, loader, k=3, progress=False)
    cert = run.certificate
    assert cert.images == 80 and cert.top1_agreement == 1.0 and cert.relative_logit_diff <= 1e-4
    # A trained model on its own training images: far above chance (10 classes).
    assert cert.accuracy >= 0.8
    ex = run.explain(folder[keep[0]][0])
    assert ex.maps.shape == (3, 7, 7)


def test_defaults_are_the_front_doors_defaults():
    from phpn.cli import build_parser
    from phpn.pipeline.discover import DiscoveryConfig

    args = build_parser().parse_args(["discover", "--demo", "fashion-mnist", "--out", "x"])
    config = DiscoveryConfig()
    assert config.k == defaults.K and config.solver == defaults.SOLVER and config.objective == defaults.OBJECTIVE
    assert config.scaling == defaults.SCALING and config.nmf_solver == defaults.NMF_SOLVER
    assert config.images_per_class == defaults.IMAGES_PER_CLASS and config.batch_size == defaults.BATCH_SIZE
    assert args.objective == defaults.OBJECTIVE and args.scaling == defaults.SCALING
    assert args.nmf_solver == defaults.NMF_SOLVER and args.batch_size == defaults.BATCH_SIZE
    assert args.seed == defaults.SEED and args.device == defaults.DEVICE
    assert api.discovery_defaults("fashion-mnist")["images_per_class"] == 100  # the demo's own choice


def test_class_name_fallback():
    assert defaults.class_names_or_indices(None, 3) == ["0", "1", "2"]
    assert defaults.class_names_or_indices(["a"], 3) == ["a", "1", "2"]
    assert defaults.class_name(["a", "b"], 1) == "b" and defaults.class_name(["a"], 4) == "4"


def test_public_names_are_documented():
    for name in phpn.__all__:
        obj = getattr(phpn, name)
        if callable(obj):
            assert obj.__doc__, name
    assert json.loads(json.dumps(phpn.__version__)) == phpn.__version__


# --- the CLI's batch explanations ----------------------------------------------------------------

@pytest.mark.slow
def test_cli_explains_images_and_folders_into_a_folder(tmp_path, capsys):
    from phpn.cli import main
    from phpn.demos import get_demo

    demo = get_demo("fashion-mnist")
    folder = demo.explain_dir() / sorted(p.name for p in demo.explain_dir().iterdir())[1]
    single = sorted(folder.iterdir())[0]
    picked = tmp_path / "picked"
    picked.mkdir()
    for p in sorted(folder.iterdir())[:3]:
        (picked / p.name).write_bytes(p.read_bytes())
    (picked / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    code = main(["explain", str(demo.run_dir), str(single), str(picked), "--out", str(out), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 5 and result["explained"] == 4 and len(result["skipped"]) == 1
    summary = json.loads((out / "explanations.json").read_text())
    assert [e["image"] for e in summary["explained"]] == [single.name] + [f"picked/{p.name}" for p in
                                                                          sorted(folder.iterdir())[:3]]
    assert summary["skipped"][0]["image"] == "picked/broken.png"
    for entry in summary["explained"]:
        assert (out / entry["png"]).is_file() and (out / entry["html"]).is_file()
        assert entry["contributions_plus_bias"] == pytest.approx(entry["logit"], abs=1e-4)
    assert len(list(out.iterdir())) == 2 * 4 + 1
    # Again into the same folder: allowed (phpn wrote it); into a folder of other files: refused, untouched.
    assert main(["explain", str(demo.run_dir), str(single), "--out", str(out)]) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["explain", str(demo.run_dir), str(single), "--out", str(other)]) == 2
    assert "is a folder that is not a 'phpn explain' output folder (it holds notes.txt)" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["notes.txt"] and (other / "notes.txt").read_text() == "mine"


def test_cli_explains_one_image_without_out(capsys):
    from phpn.cli import main
    from phpn.demos import get_demo

    demo = get_demo("fashion-mnist")
    image = next(iter(sorted(next(iter(sorted(demo.explain_dir().iterdir()))).iterdir())))
    assert main(["explain", str(demo.run_dir), str(image), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["contributions_plus_bias"] == pytest.approx(obj["logit"], abs=1e-4)
    assert main(["explain", str(demo.run_dir), str(image.parent)]) == 2
    assert "Pass --out DIR" in capsys.readouterr().err


def test_cli_doctor_honours_the_preprocessing_flags(capsys):
    from phpn.cli import main

    assert main(["doctor", "--demo", "fashion-mnist", "--resize", "56", "--crop", "56", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["input_size"] == [1, 56, 56] and obj["feature_shape"] == [128, 14, 14]


def test_a_torchvision_model_built_in_user_code():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=5)
    with torch.no_grad():  # a trained-looking BatchNorm, not the identity of a fresh one
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    loader = DataLoader(TensorDataset(x, torch.arange(20) % 5), batch_size=10)
    run = phpn.decompose(model, loader, k=2, progress=False)
    assert run.meta["model"]["feature_shape"] == [512, 1, 1]
    cert = run.certify(loader)
    assert cert.top1_agreement == 1.0 and cert.passed


def test_a_live_transformers_classifier_is_read_through_its_logits():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3,
                                      id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    torch.manual_seed(0)
    model = transformers.ConvNextForImageClassification(cfg).eval()
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    run = phpn.decompose(model, DataLoader(TensorDataset(x, torch.arange(12) % 3), batch_size=4), k=2,
                         progress=False)
    assert run.certificate.top1_agreement == 1.0 and run.certificate.passed
    assert run.class_names == ["a", "b", "c"]
    ex = run.explain(x[0])
    with torch.no_grad():
        assert ex.logit == pytest.approx(float(model(x[:1]).logits.max()), abs=1e-4)
