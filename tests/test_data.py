import numpy as np
import pytest
from PIL import Image

from phpn.errors import ConfigError, DataError
from phpn.images.folders import scan_image_folder
from phpn.images.preprocess import Preprocess, load_image, to_rgb


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(mode, tmp_path):
    arr = (np.arange(64 * 48) % 251).reshape(48, 64)
    image = Image.fromarray(arr.astype(np.uint8)).convert(mode) if mode not in ("I;16", "I", "F") else \
        Image.fromarray((arr * 200).astype(np.uint16 if mode == "I;16" else np.int32 if mode == "I" else np.float32))
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (64, 48)
    if mode in ("I;16", "I", "F"):
        # High-bit-depth images are rescaled to their own range, not clipped to white.
        values = np.asarray(rgb)[:, :, 0]
        assert values.min() == 0 and values.max() == 255


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)


def test_preprocess_shapes_and_normalisation():
    pre = Preprocess(resize=32, crop=28, mean=(0.5,), std=(0.5,), channels=1)
    x = pre(Image.new("RGB", (64, 40), (255, 255, 255)))
    assert x.shape == (1, 28, 28)
    assert float(x.min()) == pytest.approx(1.0) and float(x.max()) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="one per input channel"):
        Preprocess(mean=(0.5,), std=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="Set --resize >= --crop"):
        Preprocess(resize=100, crop=224)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 90,000 pixels: far above, PIL raises
    with pytest.raises(DataError, match="too large to decode safely"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60_000)  # between 1x and 2x: PIL only warns
    with pytest.raises(DataError, match="too large to decode safely"):
        load_image(path)


def test_unreadable_image_message(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(b"GIF89a but not really")
    with pytest.raises(DataError, match="x.jpg is not a readable image"):
        load_image(path)


def _folder(root, names, per_class=5):
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / name / f"{i}.png")
    return root


def test_folders_match_by_name_number_or_order(tmp_path):
    names = ["cat", "dog", "bird"]
    by_name = scan_image_folder(_folder(tmp_path / "a", ["Dog", "bird"]), class_names=names, num_classes=3)
    assert [(c.folder, c.class_index) for c in by_name.classes] == [("Dog", 1), ("bird", 2)]
    by_number = scan_image_folder(_folder(tmp_path / "b", ["2", "07_x"]), num_classes=10)
    assert by_number.class_indices == [2, 7]
    cub = scan_image_folder(_folder(tmp_path / "c", ["001.Black_footed_Albatross", "002.Laysan_Albatross"]),
                            num_classes=200)
    assert cub.class_indices == [0, 1]
    by_order = scan_image_folder(_folder(tmp_path / "d", ["zebra", "ant", "moose"]), num_classes=3)
    assert [c.folder for c in by_order.classes] == ["ant", "moose", "zebra"]


def test_mismatched_classes_messages(tmp_path):
    root = _folder(tmp_path / "a", ["zebra", "ant"])
    with pytest.raises(DataError, match="2 class folders but the model has 5 classes"):
        scan_image_folder(root, num_classes=5)
    with pytest.raises(DataError, match="match none of the model's class names: ant, zebra"):
        scan_image_folder(root, class_names=["cat", "dog", "bird"], num_classes=3)


def test_sampling_is_deterministic_and_per_class(tmp_path):
    root = _folder(tmp_path / "a", ["0", "1"], per_class=20)
    a = scan_image_folder(root, num_classes=2, images_per_class=5, seed=3)
    b = scan_image_folder(root, num_classes=2, images_per_class=5, seed=3)
    c = scan_image_folder(root, num_classes=2, images_per_class=5, seed=4)
    assert [x.paths for x in a.classes] == [x.paths for x in b.classes]
    assert [x.paths for x in a.classes] != [x.paths for x in c.classes]
    assert all(len(x.paths) == 5 for x in a.classes)


def test_interpolation_follows_the_model_and_round_trips():
    from phpn.models.zoo import default_preprocess

    assert default_preprocess("swin_t").interpolation == "bicubic"
    assert default_preprocess("resnet18").interpolation == "bilinear"
    pre = Preprocess(resize=40, crop=32, interpolation="bicubic")
    assert Preprocess.from_dict(pre.to_dict()) == pre
    assert Preprocess.from_dict({k: v for k, v in pre.to_dict().items() if k != "interpolation"}).interpolation == "bilinear"
    with pytest.raises(ConfigError, match="Unknown interpolation 'lanczos'"):
        Preprocess(interpolation="lanczos")
