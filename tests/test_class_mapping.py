"""Class folders map to the model's classes all or nothing, and the mapping is kept."""
import pytest
from PIL import Image

from phpn.errors import DataError
from phpn.images.folders import MAPPING_BY, match_class_folders, scan_image_folder

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _folder(root, names, per_class=2):
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / name / f"{i}.png")
    return root


def test_names_match_ignoring_case_spaces_and_punctuation():
    folders = ["t-shirt-top", "ankle_boot", "TROUSER"]
    indices, how, names = match_class_folders(folders, FASHION, 10)
    assert indices == [0, 9, 1] and how == "name" and names is None


def test_numbers_count_from_zero_and_cub_folders_from_one():
    assert match_class_folders(["0", "007", "3"], None, 10) == ([0, 7, 3], "index", None)
    assert match_class_folders(["00_t-shirt-top", "09_ankle-boot"], FASHION, 10) == ([0, 9], "index", None)
    cub = ["001.Black_footed_Albatross", "200.Common_Yellowthroat"]
    assert match_class_folders(cub, None, 200) == ([0, 199], "index-from-1", None)
    # With class names, the name after the number decides where counting starts.
    assert match_class_folders(["1.Trouser", "9.Ankle_boot"], FASHION, 10)[0] == [1, 9]
    assert match_class_folders(["2.Trouser"], FASHION, 10)[0] == [1]


def test_one_based_numbers_are_refused_with_the_reason():
    with pytest.raises(DataError) as err:
        match_class_folders([str(i) for i in range(1, 11)], FASHION, 10)
    text = str(err.value)
    assert "name classes the model does not have (it has 10 classes, numbered 0 to 9): 10." in text
    assert "The folders look numbered from 1 (1 to 10): rename them 0 to 9" in text


def test_an_index_out_of_range_refuses_instead_of_renumbering():
    with pytest.raises(DataError, match=r"numbered 0 to 2\): 7\."):
        match_class_folders(["0", "1", "7"], None, 3)


def test_a_partial_name_match_lists_the_unmatched_folders_and_a_close_name():
    folders = ["T-shirt"] + FASHION[1:]
    with pytest.raises(DataError) as err:
        match_class_folders(folders, FASHION, 10)
    text = str(err.value)
    assert "match none of the model's class names: T-shirt." in text
    assert "Expected names: T-shirt/top, Trouser," in text
    assert "'T-shirt' might be 'T-shirt/top'" in text


def test_names_and_numbers_are_never_mixed():
    with pytest.raises(DataError, match="match none of the model's class names: 3"):
        match_class_folders(["Trouser", "3"], FASHION, 10)
    with pytest.raises(DataError, match="Some class folders are numbered and others are not: cat"):
        match_class_folders(["0", "cat"], None, 2)


def test_two_folders_for_one_class_are_refused():
    with pytest.raises(DataError, match="Two class folders map to the same model class: 1, 01"):
        match_class_folders(["1", "01"], None, 3)


def test_an_ambiguous_name_asks_for_an_index():
    names = ["crane", "crane", "heron"]
    with pytest.raises(DataError, match=r"'crane' fits several classes \(0, 1\): name it by index"):
        match_class_folders(["crane", "heron"], names, 3)


def test_a_class_names_list_of_the_wrong_length_is_refused():
    with pytest.raises(DataError, match="The class-names list has 3 names but the model has 4 classes"):
        match_class_folders(["a"], ["a", "b", "c"], 4)


def test_folders_name_the_classes_when_the_model_has_no_names(tmp_path):
    data = scan_image_folder(_folder(tmp_path / "d", ["zebra", "ant", "moose"]), num_classes=3)
    assert data.class_names == ["ant", "moose", "zebra"]
    assert data.class_mapping == {"by": "folder-names", "meaning": MAPPING_BY["folder-names"],
                                  "folders": {"ant": 0, "moose": 1, "zebra": 2}, "class_names_from_folders": True}
    with pytest.raises(DataError, match="3 class folders but the model has 4 classes"):
        scan_image_folder(tmp_path / "d", num_classes=4)


def test_the_mapping_is_kept_with_the_data(tmp_path):
    data = scan_image_folder(_folder(tmp_path / "d", ["Bag", "coat"]), class_names=FASHION, num_classes=10)
    assert data.class_mapping["by"] == "name" and data.class_mapping["folders"] == {"coat": 4, "Bag": 8}
    assert data.class_names is None and data.summary()["class_mapping"] == data.class_mapping


def test_cli_takes_class_names_from_folders_and_records_the_mapping(tmp_path, capsys):
    import json
    import textwrap

    import torch
    from conftest import TinyNet
    from safetensors.torch import save_file

    from phpn.cli import main

    (tmp_path / "net.py").write_text(textwrap.dedent('''
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                              nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
                self.fc = nn.Linear(8, 4)

            def forward(self, x):
                return self.fc(self.features(x).mean((2, 3)))
    '''))
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in TinyNet().state_dict().items()}, str(tmp_path / "net.safetensors"))
    data = _folder(tmp_path / "data", ["dog", "ant", "cat", "bee"])
    code = main(["discover", "--checkpoint", str(tmp_path / "net.safetensors"), "--model-def",
                 f"{tmp_path / 'net.py'}:Net", "--resize", "16", "--crop", "16", "--data", str(data), "--k", "2",
                 "--solver", "none", "--device", "cpu", "--quiet", "--json", "--out", str(tmp_path / "run")])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["class_mapping"]["by"] == "folder-names" and out["class_mapping"]["class_names_from_folders"]
    assert out["class_mapping"]["folders"] == {"ant": 0, "bee": 1, "cat": 2, "dog": 3}
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["model"]["class_names"] == ["ant", "bee", "cat", "dog"]
    assert meta["data"]["class_mapping"] == out["class_mapping"]
    # Explaining with the run uses the names it recorded, though the model itself has none.
    code = main(["explain", str(tmp_path / "run"), str(data / "cat" / "0.png"), "--checkpoint",
                 str(tmp_path / "net.safetensors"), "--model-def", f"{tmp_path / 'net.py'}:Net", "--resize", "16",
                 "--crop", "16", "--class", "cat", "--json"])
    explained = json.loads(capsys.readouterr().out)
    assert code == 0 and explained["class"] == 2 and explained["class_name"] == "cat"


def test_a_run_records_folder_names_without_changing_the_shared_model(tiny_loaded, tmp_path):
    """The app shares one loaded model between visitors: discovery records the folders' names
    in the run instead of renaming the model's classes."""
    from dataclasses import replace

    from conftest import tiny_split

    from phpn.pipeline.discover import DiscoveryConfig, discover

    nameless = replace(tiny_loaded, class_names=None)
    data = scan_image_folder(_folder(tmp_path / "d", ["dog", "ant", "cat", "bee"], per_class=3), num_classes=4)
    run = discover(nameless, tiny_split(nameless.model), data, nameless.preprocess,
                   DiscoveryConfig(k=2, device="cpu", solver="none"))
    assert run.meta["model"]["class_names"] == ["ant", "bee", "cat", "dog"] and nameless.class_names is None
    assert run.meta["data"]["class_mapping"]["class_names_from_folders"] is True
    assert run.class_names[3] == "dog"
