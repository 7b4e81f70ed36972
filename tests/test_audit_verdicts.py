"""The expert's verdict on the audit flows back: a finding confirmed ("spurious", "background") or
dismissed in the run's notes; the findings and verdicts in the HTML reports and the run's zip; the
accuracy with the prototypes confirmed spurious switched off; and the same on the Audit page."""
from __future__ import annotations

import copy
import html
import io
import json
import zipfile

import pytest
import torch
from test_annotations import world  # noqa: F401 - the trained tiny model, its run and labelled images

from phpn.api import explain_image
from phpn.errors import ConfigError
from phpn.images.batches import load_batch
from phpn.pipeline.audit import Audit, AuditEntry
from phpn.runs import annotations as A
from phpn.runs.store import load_run
from phpn.show import report


def _audit(run) -> Audit:
    """A made-up audit of every prototype of the run (scores 11.5, 11.0, ... highest first): the
    reports and the zip take any audit, so the numbers are known here."""
    keys = [(c, i) for c in run.class_indices.tolist() for i in range(run.k)]
    entries = [AuditEntry(class_index=c, class_name=run.class_names[c], prototype=i, score=11.5 - 0.5 * n,
                          reasons=[f"causal: reason <{n}>"] if n < 2 else [], signals={}, stands_out=n == 0)
               for n, (c, i) in enumerate(keys)]
    return Audit(entries=entries, images=32, images_per_class=8, baselines={}, baseline_scores=[3.0])


def test_a_finding_is_confirmed_or_dismissed_in_the_notes_and_kept_beside_the_run(world, tmp_path):  # noqa: F811
    _, _, _, _, run, folder = world
    notes = A.Annotations.for_run(run)
    notes.set(2, 1, name="sky", flags=["colour", "background"])
    assert notes.verdict(2, 1) == "background" and notes.verdict(0, 0) is None
    notes.set_verdict(2, 1, "spurious")  # the verdict replaces the other verdict, keeps the rest
    assert notes.get(2, 1).flags == ("colour", "spurious") and notes.get(2, 1).name == "sky"
    notes.set_verdict(2, 1, "dismissed")
    assert notes.get(2, 1).flags == ("colour", "dismissed") and notes.verdict(2, 1) == "dismissed"
    notes.set_verdict(1, 0, "spurious")
    notes.set_verdict(1, 2, "spurious")
    notes.set_verdict(2, 0, "spurious")
    assert notes.spurious_off() == {1: [0, 2], 2: [0]}
    notes.set_verdict(2, 0, None)  # cleared: no flag left, so no note
    assert (2, 0) not in notes.notes and notes.spurious_off() == {1: [0, 2]}
    with pytest.raises(ConfigError) as err:
        notes.set_verdict(0, 0, "wrong")
    assert err.value.problem == "“wrong” is not a verdict."
    assert err.value.fix == "Pick one of spurious, background or dismissed (or none to clear it)."
    assert [A.verdict_words(v) for v in ("spurious", "background", "dismissed", None)] == [
        "confirmed: spurious", "confirmed: background", "dismissed", "not judged"]
    # the same notes file as every other note: saved beside a copy of the run and read back
    copy_dir = tmp_path / "run"
    copy_dir.mkdir()
    for p in folder.iterdir():
        if p.name != "annotations.json":
            (copy_dir / p.name).write_bytes(p.read_bytes())
    A.save_annotations(notes, copy_dir)
    again = A.load_annotations(load_run(copy_dir))
    assert again.verdict(2, 1) == "dismissed" and again.spurious_off() == {1: [0, 2]}


def test_findings_and_verdicts_go_into_the_reports_and_the_zip(world):  # noqa: F811
    _, _, _, pre, run, _ = world
    audit = _audit(run)
    notes = A.Annotations.for_run(run)
    notes.set_verdict(0, 0, "spurious")
    notes.set_verdict(0, 1, "dismissed")
    rows = report.audit_findings(audit, notes, class_index=0)
    assert [(r["rank"], r["prototype"], r["score"], r["verdict"]) for r in rows] == [
        (1, 0, 11.5, "spurious"), (2, 1, 11.0, "dismissed"), (3, 2, 10.5, None)]
    assert rows[0]["reasons"] == ["causal: reason <0>"] and rows[0]["stands_out"] and not rows[1]["stands_out"]
    assert [r["rank"] for r in report.audit_findings(audit, None, class_index=1)] == [4, 5, 6]

    page = report.class_report(run, 0, preprocess=pre, notes=notes, audit=audit)
    section = page[page.index("<h2>Audit</h2>"):]
    assert section.startswith(f"<h2>Audit</h2><p>{html.escape(audit.summary)}</p>")  # escaped, as every text
    assert "12 prototypes audited on 32 labelled images" in section
    assert ("<tr><td>1</td><td class=l>prototype 1 (stands out)</td><td>11.50</td>"
            "<td class=l>causal: reason &lt;0&gt;</td><td class=l>confirmed: spurious</td></tr>") in section
    assert ("<tr><td>2</td><td class=l>prototype 2</td><td>11.00</td><td class=l>causal: reason &lt;1&gt;</td>"
            "<td class=l>dismissed</td></tr>") in section
    assert "<tr><td>3</td><td class=l>prototype 3</td><td>10.50</td><td class=l>—</td><td class=l>not judged</td>" \
        in section and section.count("<tr><td>") == 3
    assert "<h2>Audit</h2>" not in report.class_report(run, 0, preprocess=pre, notes=notes)  # none without an audit
    # from the audit's dict (a saved audit.json) just the same
    assert report.audit_html(audit.to_dict(), notes, 0) == report.audit_html(audit, notes, 0)

    def files(data: bytes) -> dict:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return {n.split("/", 1)[1]: zf.read(n) for n in zf.namelist()}

    plain = files(report.run_zip_bytes(run, "r", notes=notes))
    audited = files(report.run_zip_bytes(run, "r", notes=notes, audit=audit))
    assert set(audited) == set(plain) | {"audit.json"} and "annotations.json" in audited
    kept = json.loads(audited["audit.json"])  # as kept beside a run: naming it, its verdicts in the notes
    assert kept["kind"] == "phpn audit" and kept["run"]["tensors_sha256"] == run.record.tensors_sha256
    saved = kept["audit"]
    assert saved["summary"] == audit.summary and saved["images"] == 32
    assert [(p["class"], p["prototype"], p["score"]) for p in saved["prototypes"][:4]] == [
        (0, 0, 11.5), (0, 1, 11.0), (0, 2, 10.5), (1, 0, 10.0)]
    assert saved["prototypes"][0]["reasons"] == ["causal: reason <0>"] and len(saved["prototypes"]) == 12
    verdicts = json.loads(audited["annotations.json"])
    assert "spurious" in json.dumps(verdicts) and "dismissed" in json.dumps(verdicts)


def test_the_explanation_report_carries_the_findings_on_its_class(world):  # noqa: F811
    _, split, data, pre, run, _ = world

    class Session:  # the parts of ModelSession explain_image uses
        preprocess = pre
        class_names = run.class_names

    notes = A.Annotations.for_run(run)
    notes.set_verdict(1, 2, "background")
    e = explain_image(Session(), run.network(split).eval(), data.root / data.classes[1].paths[0], class_index=1)
    page = report.explanation_report(e, run, preprocess=pre, image_name="x.png", notes=notes, audit=_audit(run))
    section = page[page.index("<h2>Audit</h2>"):]
    assert [r.split("</td>")[0] for r in section.split("<tr><td>")[1:]] == ["4", "5", "6"]  # class 1's ranks
    assert "<td class=l>prototype 3</td><td>10.50</td>" not in section  # class 0's third is not shown
    assert "<td>9.00</td><td class=l>—</td><td class=l>confirmed: background</td>" in section


def test_the_accuracy_without_the_spurious_prototypes_is_the_head_without_them(world):  # noqa: F811
    model, split, data, pre, run, _ = world
    net = run.network(split).eval()
    notes = A.Annotations.for_run(run)
    for c, i in [(1, 0), (1, 2), (2, 1)]:
        notes.set_verdict(c, i, "spurious")
    notes.set_verdict(3, 0, "background")  # confirmed background, not spurious: stays on
    result = A.switch_off(net, data, pre, notes.spurious_off())
    assert result.switched_off == {1: [0, 2], 2: [1]}
    edited = copy.deepcopy(model)  # the same edit by hand on the model's head
    with torch.no_grad():
        for c, protos in result.switched_off.items():
            edited.fc.weight[c] -= run.prototypes[run.class_indices.tolist().index(c), protos].sum(0).float()
    paths = [p for c in data.classes for p in c.paths]
    batch, _, _ = load_batch(data.root, paths, pre)
    truth = torch.tensor([int(p.split("/")[0]) for p in paths])
    with torch.no_grad():
        by_hand = edited(batch).argmax(1)
    assert result.edited_accuracy == pytest.approx(float((by_hand == truth).double().mean()))
    assert result.edited_accuracy < result.original_accuracy


@pytest.mark.slow
def test_the_audit_page_takes_verdicts_and_switches_the_spurious_prototypes_off(tmp_path, monkeypatch):
    pytest.importorskip("streamlit.testing.v1")
    from streamlit.testing.v1 import AppTest  # noqa: PLC0415 - optional: the app's test harness
    from test_app import APP, _clean, _demo_ready, _errors, app_settings_in  # noqa: PLC0415 - the app tests' helpers

    if not _demo_ready():
        pytest.skip("the fashion-mnist demo assets are not there")
    app_settings_in(tmp_path, monkeypatch)  # workspaces beside the data root, never inside it
    at = AppTest.from_file(APP, default_timeout=180).run()
    at.switch_page("pages/audit.py").run()
    _clean(at)
    at.radio(key="audit_source").set_value("The demo's held-out images")
    at.number_input(key="audit_cap").set_value(2)
    at.button(key="audit_go").click().run()
    _clean(at)
    assert not _errors(at)
    audit = at.session_state["audit_result"][1]
    notes = at.session_state["run"].notes
    assert "No prototype is confirmed spurious yet." in " ".join(c.value for c in at.caption)
    table = at.dataframe[0].value  # the ranking: the page's first table
    assert list(table["expert's verdict"]) == ["not judged"] * len(audit.entries)

    first, second = audit.entries[0], audit.entries[1]
    at.selectbox(key="audit_pick").set_value(0)
    at.radio(key="audit_verdict").set_value("spurious")
    at.button(key="FormSubmitter:audit_verdict_form-Save the verdict").click().run()
    _clean(at)
    at.selectbox(key="audit_pick").set_value(1)
    at.radio(key="audit_verdict").set_value("dismissed")
    at.button(key="FormSubmitter:audit_verdict_form-Save the verdict").click().run()
    _clean(at)
    assert notes.verdict(first.class_index, first.prototype) == "spurious"
    assert notes.verdict(second.class_index, second.prototype) == "dismissed"
    table = at.dataframe[0].value  # the ranking: the page's first table
    assert list(table["expert's verdict"][:2]) == ["confirmed: spurious", "dismissed"]
    assert any(e.label.startswith("2. ") and e.label.endswith(" · dismissed") for e in at.expander)
    assert "Dismissed in your notes: looked at, and judged not a shortcut." in " ".join(c.value for c in at.caption)

    at.button(key="audit_switch_off").click().run()
    _clean(at)
    result = at.session_state["audit_switched_off"][2]
    assert result.switched_off == {first.class_index: [first.prototype]}
    assert result.images == audit.images  # the audited images
    shown = [w.value for w in at.warning]
    assert result.summary(at.session_state["run"].run.class_names) in shown

    # the Export page's class report carries the audit and the verdict
    at.switch_page("pages/export.py").run()
    _clean(at)
    at.selectbox(key="export_class").set_value(first.class_index)
    at.button(key="build_class_report").click().run()
    _clean(at)
    page = at.session_state["class_report"][2]
    assert "<h2>Audit</h2>" in page and "<td class=l>confirmed: spurious</td></tr>" in page


@pytest.mark.slow
def test_the_audit_page_keeps_the_audit_beside_a_saved_run_and_shows_it_again(tmp_path, monkeypatch):
    pytest.importorskip("streamlit.testing.v1")
    from streamlit.testing.v1 import AppTest  # noqa: PLC0415 - optional: the app's test harness
    from test_app import APP, _clean, _demo_ready, _errors, app_settings_in  # noqa: PLC0415 - the app tests' helpers
    from test_app_state import _save_run  # noqa: PLC0415 - the app tests' helpers

    if not _demo_ready():
        pytest.skip("the fashion-mnist demo assets are not there")
    app_settings_in(tmp_path, monkeypatch)
    at = AppTest.from_file(APP, default_timeout=180).run()
    # On the shipped demo run the findings are shown, and the page says why they are not kept.
    at.switch_page("pages/audit.py").run()
    at.radio(key="audit_source").set_value("The demo's held-out images")
    at.number_input(key="audit_cap").set_value(2)
    at.button(key="audit_go").click().run()
    _clean(at)
    assert not _errors(at)
    assert "The audit is not kept beside the run: " in " ".join(c.value for c in at.caption)
    # On the visitor's own copy it is kept (audit.json), and shown again once the session forgets it.
    folder = _save_run(at, "audited")
    at.switch_page("pages/audit.py").run()
    at.button(key="audit_go").click().run()
    _clean(at)
    audit = at.session_state["audit_result"][1]
    assert (folder / "audit.json").is_file() and audit.saved_to == str(folder / "audit.json")
    assert "Kept beside the run (audit.json)." in " ".join(c.value for c in at.caption)
    del at.session_state["audit_result"]
    at.run()
    _clean(at)
    assert any(i.value.startswith("The last audit of this run, kept beside it on ") for i in at.info)
    again = at.session_state["audit_result"][1]
    assert [(e.class_index, e.prototype, round(e.score, 6)) for e in again.entries] == \
        [(e.class_index, e.prototype, round(e.score, 6)) for e in audit.entries]
