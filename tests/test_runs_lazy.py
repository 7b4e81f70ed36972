"""Format-2 runs: shards read (and checked) only when one of their classes is needed; format-1
runs still open; saving and opening gives back exactly what was saved."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_split

import phpn.runs.store as runs
from phpn.errors import RunError
from phpn.images.folders import scan_image_folder
from phpn.pipeline.discover import DiscoveryConfig, discover
from phpn.runs.record import RunRecord
from phpn.runs.store import META, TENSOR_NAMES, TENSORS, check_run_target, load_run, save_run, verify_run

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("large_run", ROOT / "scripts" / "large_run.py")
large_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(large_run)


def _shard_of(path: Path, class_index: int) -> dict:
    meta = json.loads((path / META).read_text())
    return next(s for s in meta["shards"] if class_index in s["classes"])


@pytest.fixture(scope="module")
def large_saved(tmp_path_factory):
    """10,000 classes (k=2, D=4) in shards of 256 classes, built and saved once."""
    run = large_run.synthetic_run(10_000, k=2, features=4, top=1, images=2)
    with pytest.MonkeyPatch.context() as patch:
        # one class: k·D float64 prototypes + k·D float32 NMF prototypes + k float64 α = 112 bytes
        patch.setattr(runs, "SHARD_BYTES", 256 * 112)
        return save_run(run, tmp_path_factory.mktemp("large") / "run"), run


@pytest.fixture
def large(large_saved, tmp_path):
    """A copy of the large run this test may damage."""
    path, run = large_saved
    return Path(shutil.copytree(path, tmp_path / "large")), run


@pytest.mark.slow
def test_shards_hold_bounded_groups_of_classes_and_run_json_only_the_index(large):
    path, run = large
    meta = json.loads((path / META).read_text())
    assert meta["format_version"] == 2 and "classes" not in meta
    assert [len(s["classes"]) for s in meta["shards"]] == [256] * 39 + [16]
    assert [c for s in meta["shards"] for c in s["classes"]] == list(range(10_000))
    assert meta["shape"] == {"classes": 10_000, "decomposed": 10_000, "k": 2, "features": 4}
    names = sorted(p.name for p in path.iterdir())
    assert len(names) == 1 + 1 + 2 * 40 and all(runs.is_run_file(n) for n in names)


@pytest.mark.slow
def test_a_corrupt_shard_stops_only_its_own_classes(large):
    path, run = large
    bad = _shard_of(path, 9000)
    raw = bytearray((path / bad["file"]).read_bytes())
    raw[-5] ^= 0x01
    (path / bad["file"]).write_bytes(bytes(raw))
    opened = load_run(path)  # run.json and the head only
    assert opened.class_meta(3) == run.meta["classes"][3]
    assert torch.equal(opened.class_prototypes(3), run.prototypes[3])
    assert opened.class_indices.tolist() == list(range(10_000)) and len(opened.meta["classes"]) == 10_000
    message = f"is damaged: {bad['file']} does not match the checksum recorded in run.json"
    with pytest.raises(RunError, match=message):
        opened.class_meta(9000)
    with pytest.raises(RunError, match=message):
        opened.class_prototypes(9000)
    with pytest.raises(RunError, match=message):
        opened.prototypes
    with pytest.raises(RunError, match=message):
        verify_run(path)


@pytest.mark.slow
def test_opening_and_reading_one_class_needs_no_other_shard(large):
    path, run = large
    keep = _shard_of(path, 3)
    for shard in json.loads((path / META).read_text())["shards"]:
        if shard is not keep and shard["file"] != keep["file"]:
            (path / shard["file"]).unlink()
            (path / shard["records"]).unlink()
    opened = load_run(path)
    assert opened.class_meta(255) == run.meta["classes"][255]
    assert torch.equal(opened.class_prototypes(0), run.prototypes[0])
    assert [e["index"] for e in opened.meta["classes"][:3]] == [0, 1, 2]
    with pytest.raises(RunError, match=r"is damaged: shard-00001-[0-9a-f]{16}\.safetensors is missing"):
        opened.class_meta(256)


@pytest.mark.parametrize("change, phrase", [
    (lambda t, r: t["prototypes"].__setitem__((0, 0, 0), float("nan")), "prototypes contains NaN or infinite values"),
    (lambda t, r: t["prototypes"].__setitem__(1, t["prototypes"][1] * 1.01),
     "its prototypes do not sum to the head rows they decompose"),
    (lambda t, r: t.pop("alpha"), "lacks alpha in shard-00000"),
    (lambda t, r: r[0].update(fidelity=[0.5]), "class 0's 'fidelity' is not a list of 2 numbers"),
    (lambda t, r: r.pop(), "class records (255) do not match the run's decomposed classes"),
])
def test_a_shard_that_matches_its_checksum_is_still_checked(large, change, phrase):
    """Contents written by hand (checksums and seal updated) are refused when their shard is read, not before."""
    from safetensors.torch import load_file, save_file

    path, _ = large
    meta = json.loads((path / META).read_text())
    shard = meta["shards"][0]
    tensors = load_file(str(path / shard["file"]))
    records = json.loads((path / shard["records"]).read_text())
    change(tensors, records)
    (path / shard["records"]).write_text(json.dumps(records))
    save_file(tensors, str(path / shard["file"]), metadata=runs.file_metadata(  # as a forger would
        run=meta["seal"]["id"], records_sha256=runs.file_sha256(path / shard["records"])))
    shard["sha256"] = runs.file_sha256(path / shard["file"])
    shard["records_sha256"] = runs.file_sha256(path / shard["records"])
    (path / META).write_text(json.dumps(RunRecord.from_dict(meta).sealed().to_dict()))
    opened = load_run(path)
    assert opened.class_meta(9000)["index"] == 9000
    with pytest.raises(RunError) as err:
        opened.class_meta(0)
    assert phrase in str(err.value)


@pytest.mark.parametrize("change, phrase", [
    (lambda m: m["shards"][0].update(file="../../outside.safetensors"), "'shards' is not a list of shard records"),
    (lambda m: m["shards"][0]["classes"].pop(), "shards hold 9999 classes, its shape says 10000"),
    (lambda m: m["shards"][0]["classes"].reverse(), "shards do not list the run's decomposed classes in order"),
    (lambda m: m["shape"].update(k="2"), "'shape' is missing or invalid"),
    (lambda m: m["head"].update(sha256="0" * 64), "does not match the checksum recorded in run.json"),
    (lambda m: m["model"].update(class_names=["a", "b"]), "run.json names 2 classes but the head has 10000"),
    (lambda m: m.update(format_version=3), "has format 3, this phpn reads formats 1, 2"),
])
def test_a_malformed_index_or_head_is_refused_when_opening(large, change, phrase):
    path, _ = large
    meta = json.loads((path / META).read_text())
    change(meta)
    (path / META).write_text(json.dumps(meta))
    with pytest.raises(RunError) as err:
        load_run(path)
    assert phrase in str(err.value)


@pytest.fixture
def discovered(tiny_loaded, image_folder):
    data = scan_image_folder(image_folder, class_names=tiny_loaded.class_names, num_classes=4)
    return discover(tiny_loaded, tiny_split(tiny_loaded.model), data, tiny_loaded.preprocess,
                    DiscoveryConfig(k=2, device="cpu", solver="none"))


def _same_run(a, b) -> None:
    for name in TENSOR_NAMES:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert list(a.meta["classes"]) == list(b.meta["classes"])
    keys = set(a.meta) - {"classes", "format_version", "tensors_sha256", "shape", "head", "shards"}
    assert keys == set(b.meta) - {"classes", "format_version", "tensors_sha256", "shape", "head", "shards"}
    assert json.dumps({key: a.meta[key] for key in keys}, sort_keys=True) == \
        json.dumps({key: b.meta[key] for key in keys}, sort_keys=True)


@pytest.mark.parametrize("per_shard", [1, 3, 100])
def test_save_then_load_gives_back_exactly_the_run(discovered, tmp_path, monkeypatch, per_shard):
    monkeypatch.setattr(runs, "SHARD_BYTES", per_shard * (2 * 8 * 12 + 2 * 8))  # k=2, D=8: 208 bytes a class
    expected_shards = -(-4 // per_shard)
    path = save_run(discovered, tmp_path / "run")
    opened = load_run(path)
    assert len(opened.meta["shards"]) == expected_shards
    assert opened.k == 2 and "prototypes" not in opened.__dict__  # nothing of the shards read yet
    for c in range(4):
        assert opened.class_meta(c) == discovered.meta["classes"][c]
    _same_run(discovered, opened)
    again = load_run(save_run(opened, tmp_path / "again"))  # a lazily opened run saves whole
    _same_run(discovered, again)
    assert again.meta["tensors_sha256"] == opened.meta["tensors_sha256"]
    assert verify_run(path).class_meta(2) == discovered.meta["classes"][2]


def test_a_replaced_prototype_tensor_stays_replaced(discovered, tmp_path):
    opened = load_run(save_run(discovered, tmp_path / "run"))
    flipped = discovered.prototypes.flip(1)
    opened.prototypes = flipped
    assert torch.equal(opened.alpha, discovered.alpha)  # reading the other tensors keeps the caller's
    assert torch.equal(opened.prototypes, flipped) and torch.equal(opened.class_prototypes(1), flipped[1])


def _write_format_1(run, folder: Path) -> Path:
    """A run as phpn wrote it before format 2: every tensor in tensors.safetensors, every class
    record in run.json, the tensors file's sha256 recorded there."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({name: getattr(run, name).contiguous() for name in TENSOR_NAMES}, str(folder / TENSORS))
    meta = {key: value for key, value in run.meta.items() if key not in ("shape", "head", "shards")}
    meta.update(format_version=1, classes=list(run.meta["classes"]), tensors_sha256=runs.file_sha256(folder / TENSORS))
    (folder / META).write_text(json.dumps(meta))
    return folder


def test_format_1_runs_open_checked_whole_and_save_as_format_2(discovered, tmp_path):
    folder = _write_format_1(discovered, tmp_path / "v1")
    old = load_run(folder)
    assert isinstance(old.meta["classes"], list) and "_shards" not in old.__dict__
    _same_run(discovered, old)
    assert old.class_meta(2) == discovered.meta["classes"][2]
    assert torch.equal(old.class_prototypes(2), discovered.prototypes[2])
    new = load_run(save_run(old, tmp_path / "v2"))
    assert new.meta["format_version"] == 2
    _same_run(old, new)
    assert sorted(p.name for p in folder.iterdir()) == [META, TENSORS]  # the format-1 run is left as it is
    raw = bytearray((folder / TENSORS).read_bytes())
    raw[-3] ^= 0x01
    (folder / TENSORS).write_bytes(bytes(raw))
    with pytest.raises(RunError, match="tensors.safetensors does not match the checksum recorded in run.json"):
        load_run(folder)  # a format-1 run is checked whole when opened


@pytest.mark.parametrize("demo", ["fashion-mnist", "imagenet-lite0"])
def test_shipped_runs_open_and_save_again_unchanged(demo, tmp_path):
    folder = ROOT / "assets" / demo / "run"
    before = sorted(p.name for p in folder.iterdir())
    old = load_run(folder)
    first = int(old.class_indices[0])
    assert old.class_meta(first)["index"] == first and torch.equal(old.class_prototypes(first), old.prototypes[0])
    _same_run(old, load_run(save_run(old, tmp_path / "again")))
    assert sorted(p.name for p in folder.iterdir()) == before  # the shipped run is left as it is


def test_replacing_a_run_leaves_only_the_new_runs_files(discovered, tmp_path):
    old_format = _write_format_1(load_run(ROOT / "assets" / "fashion-mnist" / "run"), tmp_path / "old")
    with pytest.raises(RunError, match="already holds a phpn run"):
        save_run(discovered, old_format)
    save_run(discovered, old_format, overwrite=True)  # a format-1 run replaced by a format-2 one
    meta = json.loads((old_format / META).read_text())
    listed = {META, meta["head"]["file"]} | {s[key] for s in meta["shards"] for key in ("file", "records")}
    assert {p.name for p in old_format.iterdir()} == listed
    discovered.meta["note"] = "second"
    discovered.prototypes = discovered.prototypes.flip(1)
    save_run(discovered, old_format, overwrite=True)
    meta2 = json.loads((old_format / META).read_text())
    listed2 = {META, meta2["head"]["file"]} | {s[key] for s in meta2["shards"] for key in ("file", "records")}
    assert {p.name for p in old_format.iterdir()} == listed2 and listed2 != listed
    assert load_run(old_format).meta["note"] == "second"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    (old_format / "shard-00000-notmine.json").write_text("{}")
    with pytest.raises(RunError, match=r"also holds files phpn did not write \(shard-00000-notmine.json\)"):
        check_run_target(old_format, overwrite=True)


def test_the_head_is_checked_row_by_row_without_reading_shards(large):
    from types import SimpleNamespace

    from phpn.runs.store import check_split

    path, run = large
    for shard in json.loads((path / META).read_text())["shards"]:
        (path / shard["file"]).unlink()  # the head check needs none of them
    opened = load_run(path)
    check_split(opened, SimpleNamespace(weight=run.head_rows.clone(), bias=run.head_bias.clone()))
    changed = run.head_rows.clone()
    changed[9000, 1] += 1e-3 * float(run.head_rows.abs().max())
    with pytest.raises(RunError, match="The loaded model's head weights differ from those this run decomposed"):
        check_split(opened, SimpleNamespace(weight=changed, bias=run.head_bias))
    with pytest.raises(RunError, match=r"made for a head of shape \(10000, 4\), but the loaded model's head is"):
        check_split(opened, SimpleNamespace(weight=run.head_rows[:, :3], bias=run.head_bias))


@pytest.mark.skipif(importlib.util.find_spec("streamlit") is None, reason="needs streamlit")
def test_the_app_reopens_a_run_without_reading_its_shards_and_names_a_damaged_one(tmp_path, monkeypatch):
    from test_app import _app, _clean, _demo_ready, _errors, _same_browser

    if not _demo_ready():
        pytest.skip("the fashion-mnist demo assets are not there")
    for name, value in {"PHPN_UPLOAD_DIR": tmp_path.parent / f"{tmp_path.name}-uploads",
                        "PHPN_DATA_ROOTS": tmp_path, "PHPN_WRITABLE_ROOTS": tmp_path,
                        "PHPN_SETTINGS_FILE": tmp_path / "no-settings.toml"}.items():
        monkeypatch.setenv(name, str(value))  # as test_app's fixture does: this visitor's files in tmp_path
    monkeypatch.delenv("PHPN_ALLOW_CODE", raising=False)
    monkeypatch.setattr(runs, "SHARD_BYTES", 1)  # one class a shard
    at = _app().run()
    at.switch_page("pages/discover.py").run()
    at.text_input(key="save_path").set_value("lazy")
    at.button(key="save_run").click().run()
    _clean(at)
    folder = at.session_state["run"].saved_to
    shard = _shard_of(folder, 9)
    raw = bytearray((folder / shard["file"]).read_bytes())
    raw[-5] ^= 0x01
    (folder / shard["file"]).write_bytes(bytes(raw))

    again = _same_browser(at, monkeypatch)  # a reload: the URL reopens the saved run
    again.query_params["run"] = "my runs / lazy"
    again.run()
    _clean(again)
    entry = again.session_state["run"]
    assert entry.saved_to == folder and not again.sidebar.warning
    assert "prototypes" not in entry.run.__dict__  # opened: no shard read for the model page
    assert entry.run.class_meta(3)["index"] == 3
    damaged = f"{shard['file']} does not match the checksum recorded in run.json"
    again.switch_page("pages/classes.py").run()
    again.selectbox(key="browser_class").set_value(9).run()  # the damaged shard's class
    _clean(again)  # said on the page, no traceback
    assert any(damaged in e for e in _errors(again))
    again.switch_page("pages/discover.py").run()  # the table of every class
    _clean(again)
    assert any(damaged in e for e in _errors(again))


@pytest.mark.slow
def test_the_command_line_checks_a_whole_run(large, capsys):
    from phpn.cli import main

    path, _ = large
    assert main(["verify", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format_version"] == 2 and out["classes"] == 10_000 and out["k"] == 2 and out["files_checked"] == 81
    bad = _shard_of(path, 9000)
    (path / bad["records"]).write_text("[]")
    assert main(["verify", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: The run at ") and \
        f"is damaged: {bad['records']} does not match the checksum recorded in run.json" in err[0]
