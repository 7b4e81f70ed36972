"""The CUB-layout loader on a tiny hand-written folder, and the synthetic generator."""
import numpy as np
import pytest
from PIL import Image

from phpn.errors import DataError
from phpn.evaluate.parts import is_cub_layout, load_cub_parts, preprocess_keypoints
from phpn.evaluate.synthetic_parts import CLASS_PARTS, PART_TYPES, generate, write_cub_layout
from phpn.images.preprocess import Preprocess

IDENTITY = Preprocess(resize=64, crop=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def write_tiny_cub(root):
    """Two images (one train, one test) of two classes; 3 parts, drawn as coloured pixels."""
    (root / "images" / "001.Alpha").mkdir(parents=True)
    (root / "images" / "002.Beta").mkdir(parents=True)
    (root / "parts").mkdir()
    # Image 1: 100 x 80 (w x h), box x 20..80, y 10..70 (60 x 60). Part 1 at (30, 20) red,
    # part 2 at (79, 69) green, part 3 not visible.
    a = np.zeros((80, 100, 3), np.uint8)
    a[20, 30] = (255, 0, 0)
    a[69, 79] = (0, 255, 0)
    Image.fromarray(a).save(root / "images/001.Alpha/a.png")
    # Image 2: 50 x 100, no useful box crop (whole image); part 3 at (10, 50) blue,
    # part 1 at (25, 2) white (cut away by the centre crop of a tall image).
    b = np.zeros((100, 50, 3), np.uint8)
    b[50, 10] = (0, 0, 255)
    b[2, 25] = (255, 255, 255)
    Image.fromarray(b).save(root / "images/002.Beta/b.png")
    (root / "images.txt").write_text("1 001.Alpha/a.png\n2 002.Beta/b.png\n")
    (root / "image_class_labels.txt").write_text("1 1\n2 2\n")
    (root / "train_test_split.txt").write_text("1 1\n2 0\n")
    (root / "bounding_boxes.txt").write_text("1 20.0 10.0 60.0 60.0\n2 0.0 0.0 50.0 100.0\n")
    (root / "classes.txt").write_text("1 001.Alpha\n2 002.Beta\n")
    (root / "parts/parts.txt").write_text("1 beak\n2 left wing\n3 tail\n")
    (root / "parts/part_locs.txt").write_text(
        "1 1 30.0 20.0 1\n1 2 79.0 69.0 1\n1 3 0.0 0.0 0\n"
        "2 1 25.0 2.0 1\n2 2 0.0 0.0 0\n2 3 10.0 50.0 1\n")
    return root


def test_cub_loader_reads_layout(tmp_path):
    root = write_tiny_cub(tmp_path / "cub")
    assert is_cub_layout(root)
    ds = load_cub_parts(root)
    assert ds.part_names == ["beak", "left wing", "tail"]
    assert [im.class_index for im in ds.images] == [0, 1]
    assert [im.is_train for im in ds.images] == [True, False]
    assert ds.class_names == {0: "001.Alpha", 1: "002.Beta"}
    assert ds.images[0].visible.tolist() == [True, True, False]
    assert ds.select("test").images[0].image_id == 2
    assert len(ds.select("train")) == 1 and len(ds.select("all")) == 2
    folder = ds.select("all").to_image_folder()
    assert folder.class_indices == [0, 1] and folder.classes[1].paths == ["002.Beta/b.png"]


def test_cub_loader_crops_box_and_maps_keypoints(tmp_path):
    ds = load_cub_parts(write_tiny_cub(tmp_path / "cub"))
    # Box 60 x 60 -> resize 30 (shorter side), crop 30: scale 1/2, pixel centres to centres.
    pre = Preprocess(resize=30, crop=30)
    x, kp, vis = ds.load(0, pre)
    assert x.shape == (3, 30, 30)
    assert kp[0] == pytest.approx([(10 + 0.5) / 2 - 0.5, (10 + 0.5) / 2 - 0.5])
    assert kp[1] == pytest.approx([(59 + 0.5) / 2 - 0.5, (59 + 0.5) / 2 - 0.5])
    assert vis.tolist() == [True, True, False]
    # Identity geometry keeps the keypoint on its pixel: the red and green pixels.
    x, kp, vis = ds.load(0, Preprocess(resize=60, crop=60, mean=(0, 0, 0), std=(1, 1, 1)))
    for part, colour in ((0, (1, 0, 0)), (1, (0, 1, 0))):
        cx, cy = (int(round(v)) for v in kp[part])
        assert x[:, cy, cx].tolist() == pytest.approx(list(colour), abs=1e-6)


def test_cub_loader_marks_keypoints_outside_the_crop_invisible(tmp_path):
    ds = load_cub_parts(write_tiny_cub(tmp_path / "cub"))
    # 50 x 100 -> resize 50, crop 50: rows 25..74 are kept; the part at y = 2 is cut away.
    x, kp, vis = ds.load(1, Preprocess(resize=50, crop=50, mean=(0, 0, 0), std=(1, 1, 1)))
    assert vis.tolist() == [False, False, True]
    assert kp[2] == pytest.approx([10, 25])
    assert x[:, 25, 10].tolist() == pytest.approx([0, 0, 1])
    xs, kps, viss, kept, skipped = ds.load_batch([0, 1], Preprocess(resize=50, crop=50))
    assert xs.shape == (2, 3, 50, 50) and kps.shape == (2, 3, 2) and kept == [0, 1] and not skipped


def test_cub_loader_class_map_and_errors(tmp_path):
    root = write_tiny_cub(tmp_path / "cub")
    ds = load_cub_parts(root, class_map={2: 7})
    assert [im.class_index for im in ds.images] == [7]
    with pytest.raises(DataError, match="not in the CUB-200-2011 annotation layout"):
        load_cub_parts(tmp_path)
    (root / "bounding_boxes.txt").write_text("1 20.0 10.0 60.0\n")
    with pytest.raises(DataError, match="expected at least 5 fields"):
        load_cub_parts(root)


def test_missing_image_is_skipped_not_fatal(tmp_path):
    root = write_tiny_cub(tmp_path / "cub")
    (root / "images/002.Beta/b.png").unlink()
    ds = load_cub_parts(root)
    xs, _, _, kept, skipped = ds.load_batch([0, 1], Preprocess(resize=40, crop=40))
    assert kept == [0] and len(skipped) == 1 and "b.png" in skipped[0][0]


def test_preprocess_keypoints_identity_and_centre_crop():
    kp = np.array([[0.0, 0.0], [63.0, 63.0], [10.0, 20.0]])
    out, inside = preprocess_keypoints(kp, (64, 64), IDENTITY)
    assert out == pytest.approx(kp) and inside.all()
    out, inside = preprocess_keypoints(np.array([[50.0, 10.0]]), (100, 50), Preprocess(resize=50, crop=50))
    assert out[0] == pytest.approx([25.0, 10.0]) and inside[0]


def test_generator_keypoints_land_on_the_parts_it_drew():
    data = generate(train_per_class=3, test_per_class=2, seed=3)
    assert data.images.shape == (8 * 5, 64, 64, 3)
    for i in range(len(data.labels)):
        parts = set(np.nonzero(data.visible[i])[0].tolist())
        assert parts <= set(CLASS_PARTS[data.labels[i]])
        assert len(parts) >= 2
        for m in parts:
            x, y = data.keypoints[i, m].astype(int)
            pixel = data.images[i, y, x].astype(int)
            assert np.abs(pixel - np.array(PART_TYPES[m].colour)).max() <= 15, (i, m, pixel)


def test_generator_is_deterministic_and_test_split_independent_of_train_size():
    a = generate(train_per_class=2, test_per_class=2, seed=5)
    b = generate(train_per_class=2, test_per_class=2, seed=5)
    c = generate(train_per_class=4, test_per_class=2, seed=5)
    assert np.array_equal(a.images, b.images)
    assert np.array_equal(a.images[~a.is_train], c.images[~c.is_train])
    assert not np.array_equal(a.images, generate(train_per_class=2, test_per_class=2, seed=6).images)


def test_generated_cub_layout_reads_back(tmp_path):
    data = generate(train_per_class=2, test_per_class=2, seed=1)
    root = write_cub_layout(data, tmp_path / "synth")
    ds = load_cub_parts(root)
    assert ds.part_names == data.part_names
    assert len(ds) == len(data.labels)
    test = ds.select("test")
    assert len(test) == 8 * 2
    for j, im in enumerate(ds.images):
        x, kp, vis = ds.load(j, IDENTITY)
        i = im.image_id - 1
        assert vis.tolist() == data.visible[i].tolist()
        assert kp[vis] == pytest.approx(data.keypoints[i][vis])
        # The loaded (normalised) image is the drawn one.
        pixels = (x.numpy().transpose(1, 2, 0) * 0.25 + 0.5) * 255
        assert np.abs(pixels - data.images[i]).max() < 0.01


def test_generator_occlusion_marks_the_left_out_part_invisible():
    data = generate(train_per_class=20, test_per_class=0, seed=2, occlusion=0.5)
    counts = data.visible.sum(1)
    assert set(counts.tolist()) == {2, 3}
    for i in np.nonzero(counts == 2)[0]:
        gone = set(CLASS_PARTS[data.labels[i]]) - set(np.nonzero(data.visible[i])[0].tolist())
        assert len(gone) == 1
        assert (data.keypoints[i, list(gone)[0]] == 0).all()


def test_every_part_is_needed_to_name_a_class():
    sets = [set(c) for c in CLASS_PARTS]
    assert len({frozenset(s) for s in sets}) == len(sets)
    for s in sets:
        for p in s:
            # Leaving out any one part leaves two parts that another class also has.
            assert sum((s - {p}) <= t for t in sets) >= 2
