"""JPEGs decoded a batch at a time (the GPU path, run here on the CPU) against Pillow's path.

The workers read the files' bytes; torchvision.io.decode_jpeg decodes the batch and
Preprocess.from_uint8 resizes, crops and normalises it. On the CPU the decoders agree bit for
bit (both are libjpeg-turbo), the "tensor" resize backend is the same operation, and Pillow's
resize ("pil" backend) differs by at most one grey level (bilinear) or two (bicubic) on a few
pixels in a thousand (nearest: as many pixels take their neighbour's value). nvJPEG on a GPU differs from libjpeg by a little more: the GPU test
measures it and asserts the same predictions.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from phpn import config as D
from phpn.cli import main
from phpn.errors import ConfigError
from phpn.images import batches as phpn_data
from phpn.images.batches import batch_decode_device, iter_batches, iter_decoded_batches, plain_jpeg
from phpn.images.preprocess import Preprocess, rgb_to_grey

skimage_data = pytest.importorskip("skimage.data")

GREY_LEVEL = 1 / 255


def _photo_folder(root, size: int = 160):
    """JPEGs of different sizes (colour and grey) plus files the batch decoder must leave to Pillow."""
    root.mkdir()
    paths = []
    for name in ("chelsea", "coffee", "camera", "astronaut", "rocket"):
        image = Image.fromarray(getattr(skimage_data, name)())
        image.thumbnail((size, size))  # keeps each photo's own aspect ratio
        image.save(root / f"{name}.jpg", quality=90)
        paths.append(f"{name}.jpg")
    chelsea = Image.open(root / "chelsea.jpg")
    chelsea.save(root / "chelsea.png")  # not a JPEG
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: Pillow's path turns it, so it stays there
    chelsea.save(root / "rotated.jpg", quality=90, exif=exif.tobytes())
    chelsea.convert("CMYK").save(root / "cmyk.jpg", quality=90)
    data = (root / "coffee.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[:len(data) // 3])
    (root / "junk.jpg").write_bytes(b"\xff\xd8\xff" + b"not a picture" * 10 + b"\xff\xd9")
    return paths + ["chelsea.png", "rotated.jpg", "cmyk.jpg", "truncated.jpg", "junk.jpg"]


def _grey_levels(a: torch.Tensor, b: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """|a - b| of two normalised batches, in grey levels of the picture."""
    return (a - b).abs() * torch.tensor(pre.std).view(1, -1, 1, 1) / GREY_LEVEL


def test_the_batch_decoder_takes_only_plain_jpegs(tmp_path):
    root = tmp_path / "photos"
    _photo_folder(root)
    plain = {p.name for p in root.iterdir() if plain_jpeg(p.read_bytes())}
    # Not the PNG, the EXIF-rotated or CMYK JPEG, the truncated one, nor one without a readable header.
    assert plain == {"chelsea.jpg", "coffee.jpg", "camera.jpg", "astronaut.jpg", "rocket.jpg"}


@pytest.mark.parametrize("backend,interpolation,channels,most", [
    ("tensor", "bilinear", 3, 0), ("tensor", "bicubic", 1, 0), ("pil", "bilinear", 3, 1), ("pil", "bicubic", 3, 2),
    ("pil", "bilinear", 1, 1), ("pil", "nearest", 3, None)])
def test_batch_decoding_on_the_cpu_matches_pillow(tmp_path, backend, interpolation, channels, most):
    root = tmp_path / "photos"
    paths = _photo_folder(root)
    pre = Preprocess(resize=96, crop=80, backend=backend, interpolation=interpolation, channels=channels,
                     mean=(0.485, 0.456, 0.406)[:channels], std=(0.229, 0.224, 0.225)[:channels])
    pillow, kept, skipped = next(iter(iter_batches(root, paths, pre, 64, workers=0)))
    batched, kept_b, skipped_b = next(iter(iter_decoded_batches(root, paths, pre, 64, workers=0)))
    assert kept_b == kept and skipped_b == skipped  # the same files kept, the same reasons, in order
    assert [rel for rel, _ in skipped] == ["truncated.jpg", "junk.jpg"]
    assert skipped[0][1].startswith("truncated.jpg is not a readable image (OSError: image file is truncated")
    assert batched.shape == pillow.shape == (len(kept), channels, 80, 80)
    diff = _grey_levels(pillow, batched, pre)
    if most is not None:  # nearest: a few pixels take their neighbour's value
        assert diff.max().item() <= most + 1e-3
    assert (diff > 0.5).float().mean().item() < 0.01  # a few pixels in a thousand at most


@pytest.mark.parametrize("colour", ["bgr", "grey"])
def test_batch_decoding_keeps_the_colour_setting(tmp_path, colour):
    root = tmp_path / "photos"
    paths = _photo_folder(root)
    pre = Preprocess(resize=64, crop=64, backend="tensor", colour=colour)
    pillow, kept, _ = next(iter(iter_batches(root, paths, pre, 64, workers=0)))
    batched, kept_b, _ = next(iter(iter_decoded_batches(root, paths, pre, 64, workers=0)))
    assert kept_b == kept and torch.equal(batched, pillow)
    plain = next(iter(iter_decoded_batches(root, paths, Preprocess(resize=64, crop=64, backend="tensor"), 64, 0)))[0]
    assert not torch.equal(batched, plain)  # the setting did change the input


def test_rgb_to_grey_is_pillows_convert_l():
    rgb = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pillow = np.asarray(Image.fromarray(rgb.permute(1, 2, 0).numpy()).convert("L"))
    assert torch.equal(rgb_to_grey(rgb)[0], torch.from_numpy(pillow.copy()))


def test_a_file_the_batch_decoder_refuses_goes_to_pillow(tmp_path, monkeypatch):
    """nvJPEG refuses some files libjpeg reads: the batch is decoded one by one, then by Pillow."""
    root = tmp_path / "photos"
    paths = _photo_folder(root)
    refused = (root / "camera.jpg").read_bytes()
    decode_jpeg, rgb = phpn_data._jpeg_decoder()
    calls = []

    def picky(data, **kw):
        calls.append(len(data) if isinstance(data, list) else 1)
        many = data if isinstance(data, list) else [data]
        if any(bytes(d.numpy()) == refused for d in many):
            raise RuntimeError("nvjpeg: unsupported")
        return decode_jpeg(data, **kw)

    monkeypatch.setattr(phpn_data, "_jpeg_decoder", lambda: (picky, rgb))
    pre = Preprocess(resize=96, crop=80, backend="tensor")
    pillow, kept, skipped = next(iter(iter_batches(root, paths, pre, 64, workers=0)))
    batched, kept_b, skipped_b = next(iter(iter_decoded_batches(root, paths, pre, 64, workers=0)))
    assert calls == [5, 1, 1, 1, 1, 1]  # the batch, then each of its JPEGs alone
    assert (kept_b, skipped_b) == (kept, skipped)
    assert torch.equal(batched, pillow)


def test_workers_read_the_bytes_in_order(tmp_path):
    root = tmp_path / "photos"
    paths = _photo_folder(root)
    pre = Preprocess(resize=64, crop=64, backend="tensor")
    alone = list(iter_decoded_batches(root, paths, pre, 3, workers=0))
    parallel = list(iter_decoded_batches(root, paths, pre, 3, workers=2))
    assert [b[1] for b in parallel] == [b[1] for b in alone] and [b[2] for b in parallel] == [b[2] for b in alone]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(alone, parallel))


def test_same_predictions_on_the_fashion_mnist_demo_saved_as_jpegs(tmp_path):
    from phpn.demos import get_demo

    demo = get_demo("fashion-mnist")
    loaded = demo.load_model()
    root, paths = tmp_path / "jpegs", []
    for folder in sorted(demo.discovery_dir().iterdir()):
        for png in sorted(folder.iterdir())[:6]:
            (root / folder.name).mkdir(parents=True, exist_ok=True)
            Image.open(png).save(root / folder.name / f"{png.stem}.jpg", quality=90)
            paths.append(f"{folder.name}/{png.stem}.jpg")
    pre = loaded.preprocess
    pillow, kept, _ = next(iter(iter_batches(root, paths, pre, 128, workers=0)))
    batched, kept_b, _ = next(iter(iter_decoded_batches(root, paths, pre, 128, workers=0)))
    assert kept_b == kept and len(kept) == 60
    with torch.no_grad():
        a, b = loaded.model(pillow), loaded.model(batched)
    assert torch.equal(a.argmax(1), b.argmax(1))
    assert (a - b).abs().max().item() <= 1e-4 * a.abs().max().item()  # grey 28x28: no resize, same decoder


def test_same_predictions_of_a_real_imagenet_model_on_resized_photos(tmp_path):
    """EfficientNet-Lite0 (real weights) on photos resized 256/224 with Pillow's resize vs the tensor's."""
    from phpn.demos import get_demo

    loaded = get_demo("imagenet-lite0").load_model()
    root = tmp_path / "photos"
    root.mkdir()
    paths = []
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        Image.fromarray(getattr(skimage_data, name)()).save(root / f"{name}.jpg", quality=90)
        paths.append(f"{name}.jpg")
    pre = loaded.preprocess
    assert pre.backend == "pil"
    pillow, _, _ = next(iter(iter_batches(root, paths, pre, 8, workers=0)))
    batched, _, _ = next(iter(iter_decoded_batches(root, paths, pre, 8, workers=0)))
    assert _grey_levels(pillow, batched, pre).max().item() <= 1 + 1e-3
    with torch.no_grad():
        a, b = loaded.model(pillow), loaded.model(batched)
    assert a.argmax(1).tolist() == b.argmax(1).tolist() == [285, 967, 450, 657]  # tabby, espresso, ...
    assert (a - b).abs().max().item() < 0.02 * a.abs().max().item()  # measured 0.00075 of max |logit|


def test_decode_modes_and_their_one_home():
    assert D.DECODES is phpn_data.DECODES == ("auto", "cpu", "gpu") and D.DECODE == "auto"
    assert batch_decode_device("auto", "cpu") is None and batch_decode_device("cpu", "cpu") is None
    with pytest.raises(ConfigError) as err:
        batch_decode_device("gpu", "cpu")
    assert err.value.problem == "--decode gpu needs the model on a CUDA device, but it runs on cpu."
    with pytest.raises(ConfigError) as err:
        batch_decode_device("nvjpeg", "cpu")
    assert (err.value.problem, err.value.fix) == ("Unknown decode mode 'nvjpeg'.", "Use one of: auto, cpu, gpu.")


def test_cli_decode_flag(image_folder, tiny_loaded, tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    save_file(tiny_loaded.model.state_dict(), str(tmp_path / "tiny.safetensors"))
    (tmp_path / "tiny.py").write_text(
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),\n"
        "                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())\n"
        "        self.fc = nn.Linear(8, 4)\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.features(x).mean((2, 3)))\n")
    model = ["--checkpoint", str(tmp_path / "tiny.safetensors"), "--model-def", f"{tmp_path / 'tiny.py'}:Net",
             "--resize", "16", "--crop", "16"]
    common = ["discover", *model, "--data", str(image_folder), "--k", "2", "--solver", "none", "--device", "cpu",
              "--workers", "0", "--quiet"]
    assert main([*common, "--decode", "gpu", "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--decode gpu needs the model on a CUDA device, but it runs on cpu" in err
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
    assert main([*common, "--out", str(tmp_path / "run")]) == 0
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["data"]["decode"] == "cpu (Pillow)"  # auto on a CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decoding_matches_pillow_and_predicts_the_same(tmp_path):
    from conftest import TinyNet

    root = tmp_path / "photos"
    paths = _photo_folder(root, size=300)
    pre = Preprocess(resize=128, crop=112)
    pillow, kept, skipped = next(iter(iter_batches(root, paths, pre, 64, workers=0)))
    on_gpu, kept_g, skipped_g = next(iter(iter_batches(root, paths, pre, 64, workers=0, decode="gpu",
                                                       device="cuda")))
    assert on_gpu.device.type == "cuda" and (kept_g, skipped_g) == (kept, skipped)
    diff = _grey_levels(pillow, on_gpu.cpu(), pre)
    print(f"nvJPEG + GPU resize vs Pillow: max {diff.max().item():.1f} grey levels, mean {diff.mean().item():.3f}")
    assert diff.mean().item() < 1.0 and diff.max().item() <= 32
    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():
        a, b = model(pillow), model(on_gpu.cpu())
    assert torch.equal(a.argmax(1), b.argmax(1))
    auto = next(iter(iter_batches(root, paths, pre, 64, workers=2, decode="auto", device="cuda")))
    assert auto[0].device.type == "cuda" and torch.equal(auto[0], on_gpu)
