"""run.json as typed records: exact round trips for the shipped runs, one sentence per problem,
and the published JSON Schema generated from the records."""
import copy
import json
from pathlib import Path

import pytest

from phpn.errors import RunError
from phpn.runs.record import (
    ABSENT,
    CertificateRecord,
    ClassRecord,
    ModelRecord,
    RunRecord,
    class_record_problem,
    confined_path,
    schema_text,
)
from phpn.runs.store import load_run

ROOT = Path(__file__).resolve().parents[1]
DEMOS = ["fashion-mnist", "imagenet-lite0"]


def _run_json(demo: str) -> dict:
    return json.loads((ROOT / "assets" / demo / "run" / "run.json").read_text())


def _records(demo: str) -> list:
    folder = ROOT / "assets" / demo / "run"
    return [r for s in _run_json(demo)["shards"] for r in json.loads((folder / s["records"]).read_text())]


@pytest.mark.parametrize("demo", DEMOS)
def test_shipped_run_json_round_trips_exactly(demo):
    d = _run_json(demo)
    record = RunRecord.from_dict(copy.deepcopy(d))
    assert record.to_dict() == d
    assert json.dumps(record.to_dict()) == json.dumps(d)  # the same keys in the same order
    assert isinstance(record.model, ModelRecord) and isinstance(record.certificate, CertificateRecord)
    assert record.format_version == 2 and record.shape.decomposed == len(_records(demo))
    assert record.certificate.passed is True and record.certificate.certificate().passed
    for entry in _records(demo):
        assert ClassRecord._parse(entry, "").to_dict() == entry and class_record_problem(entry, record.shape.k) == ""


@pytest.mark.parametrize("demo", DEMOS)
def test_an_opened_run_gives_its_record_typed(demo):
    run = load_run(ROOT / "assets" / demo / "run")
    record = run.record
    assert record.model.arch == {"fashion-mnist": "fashion-cnn", "imagenet-lite0": "efficientnet-lite0"}[demo]
    assert record.class_names == run.meta["model"]["class_names"] == run.class_names
    assert record.preprocessing().crop == run.meta["preprocess"]["crop"]
    assert record.shards[0].classes == run.class_indices.tolist()[:len(record.shards[0].classes)]
    assert record.to_dict() == {k: v for k, v in run.meta.items() if k != "classes"}


@pytest.mark.parametrize("demo", DEMOS)
def test_shipped_runs_are_sealed_and_a_save_keeps_their_numbers(demo, tmp_path):
    """The shipped runs open sealed (run.json's meaning under its seal), and keep their numbers
    when saved again."""
    from phpn.runs.store import save_run

    old = load_run(ROOT / "assets" / demo / "run")
    assert old.record.integrity.startswith("sealed: run.json's meaning") and old.record.seal_problem() == ""
    new = load_run(save_run(old, tmp_path / "run"))
    assert new.record.integrity.startswith("sealed: run.json's meaning") and new.record.seal_problem() == ""
    assert new.meta["certificate"] == old.meta["certificate"] and new.meta["tensors_sha256"] != ""
    assert list(new.meta["classes"]) == list(old.meta["classes"])


def test_a_run_in_memory_has_a_record_without_an_index():
    record = RunRecord.from_dict({"model": {"arch": "tiny", "class_names": None}, "config": {"auto_k": 5}})
    assert record.format_version is ABSENT and record.shards is ABSENT and record.class_names is None
    assert record.auto_k == 5


def _problem(change) -> str:
    d = _run_json("fashion-mnist")
    change(d)
    with pytest.raises(RunError) as err:
        RunRecord.from_dict(d, where="/runs/x")
    text = str(err.value)
    assert text.startswith("The run at /runs/x is not valid: ") and text.endswith(". Run discovery again.")
    return text.removeprefix("The run at /runs/x is not valid: ").removesuffix(". Run discovery again.")


@pytest.mark.parametrize("change, problem", [
    (lambda d: d["shape"].update(k=-1), "run.json's 'shape' is missing or invalid (shape.k is -1, it must "
                                        "be at least 0)"),
    (lambda d: d["head"].update(file="../head.safetensors"),
     "run.json's 'head' is missing or invalid (head.file '../head.safetensors' is not a data file name "
     "of this run)"),
    (lambda d: d["shards"][0].update(sha256="x"),
     "run.json's 'shards' is not a list of shard records (shards[0].sha256 'x' is not a sha256)"),
    (lambda d: d["certificate"].update(top1_agreement=1.5),
     "run.json's certificate.top1_agreement is 1.5, it must be from 0 to 1"),
    (lambda d: d["certificate"].update(passed=False), "run.json's certificate.passed says False, but its own numbers "
                                                      "give True"),
    (lambda d: d["certificate"].update(agreed=999), "run.json's certificate.top1_agreement (1.0) does not follow "
                                                    "from 999 of 1000 images agreeing"),
    (lambda d: d["certificate"].pop("max_head_error"), "run.json's certificate.max_head_error is missing"),
    (lambda d: d["model"].update(num_classes="10"), "run.json's model.num_classes is not a whole number"),
    (lambda d: d["model"]["class_names"].pop(), "run.json names 9 classes but the head has 10"),
    (lambda d: d["timings"].update(total_s="fast"), "run.json's timings.total_s is not a number"),
    (lambda d: d.update(data=[]), "run.json's 'data' is not an object"),
    (lambda d: d.update(seal={"version": 1}), "run.json's 'seal' is damaged (seal.id is missing)"),
])
def test_each_problem_is_one_sentence(change, problem):
    assert _problem(change) == problem


@pytest.mark.parametrize("change, problem", [
    (lambda e: e.update(paths=["/etc/passwd"]), "class 0's paths[0] '/etc/passwd' is not a relative path inside the "
                                                "image folder (absolute, or leaving it)"),
    (lambda e: e["top_patches"][1][0].update(path="../../secret.png"),
     "class 0's top_patches[1][0].path '../../secret.png' is not a relative path inside the image folder "
     "(absolute, or leaving it)"),
    (lambda e: e.update(heldout_paths=["C:\\\\images\\\\a.png"]), "class 0's heldout_paths[0] 'C:\\\\\\\\images"
                                                                   "\\\\\\\\a.png' is not a relative path inside the "
                                                                   "image folder (absolute, or leaving it)"),
    (lambda e: e.update(folder="/"), "class 0's folder '/' is not a relative path inside the image folder"),
    (lambda e: e.update(k=4), "class 0's 'k' is not a whole number from 1 to 3"),
    (lambda e: e.update(alpha=[1, 2]), "class 0's 'alpha' is not a list of 3 numbers"),
    (lambda e: e.update(paths="a.png"), "class 0's 'paths' is not a list of texts"),
])
def test_class_record_problems(change, problem):
    entry = copy.deepcopy(_records("fashion-mnist")[0])
    change(entry)
    assert class_record_problem(entry, 3) == problem


def test_confined_paths():
    for good in ("a.png", "cls/a.png", "cls/./a b.png", "..a/b.png"):
        assert confined_path(good), good
    for bad in ("", "/a.png", "../a.png", "cls/../../a.png", "C:/a.png", "c:a.png", "cls\\a.png", "a\x00.png", None):
        assert not confined_path(bad), bad


def test_the_published_schema_is_the_one_the_records_give():
    assert (ROOT / "docs" / "run.schema.json").read_text() == schema_text(), \
        "docs/run.schema.json is stale: python -m phpn.runs.record > docs/run.schema.json"


@pytest.mark.parametrize("demo", DEMOS)
def test_shipped_runs_and_their_records_validate_against_the_schema(demo, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from phpn.runs.store import save_run

    schema = json.loads((ROOT / "docs" / "run.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    resaved = save_run(load_run(ROOT / "assets" / demo / "run"), tmp_path / "run")  # sealed, as written now
    for d in (_run_json(demo), json.loads((resaved / "run.json").read_text())):
        assert [e.message for e in validator.iter_errors(d)] == []
    records = jsonschema.Draft202012Validator({"$defs": schema["$defs"], "$ref": "#/$defs/ClassRecord"})
    for entry in _records(demo):
        assert [e.message for e in records.iter_errors(entry)] == []
    bad = _run_json(demo)
    bad["shape"]["k"] = -1
    bad["head"]["file"] = "../x"
    assert sorted(e.message for e in validator.iter_errors(bad)) == \
        ["'../x' does not match '^(head|shard-\\\\d{5})-[0-9a-f]{16}\\\\.(safetensors|json)$'",
         "-1 is less than the minimum of 0"]
