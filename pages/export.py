"""Export: the run as a zip, and self-contained HTML reports of a class or an explanation;
the expert's notes on the prototypes go with each."""
import json
import re

import streamlit as st

from phpn.api import describe_origin, origin_words
from phpn.app import frame as S
from phpn.config import class_name
from phpn.show import report

S.frame()
st.title("Export")
entry = S.require_run()
model = S.current_model()
run = entry.run
notes = entry.notes
names = run.class_names
notes_key = json.dumps(notes.to_dict(), sort_keys=True) if notes is not None else ""
audited = st.session_state.get("audit_result")  # the Audit page's last audit of this run, if any
audit = audited[1] if audited and audited[0] == entry.id else None
notes_key += "|" + json.dumps(audit.to_dict(), sort_keys=True) if audit is not None else ""


def _name(i: int) -> str:
    return class_name(names, i)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "item"


stem = _slug(model.session.demo or model.session.loaded.arch)
recorded_model = run.model_info
origin = describe_origin(recorded_model.get("origin"))  # the upload's own name and how it was loaded

st.header("The run")
st.caption("A zip of the run folder: `run.json` (model identity, every setting and seed, timings, certificate, "
           "the index of the classes), the head the prototypes sum to, and shards of classes (prototypes, α, "
           "per-class statistics, top patches), each file checksummed. "
           "Upload the zip again on the Discover page (Load a saved run) to reopen it, checked whole, or unzip it and "
           "explain images with it from a shell: `python -m phpn explain RUN_FOLDER IMAGE …`. Your notes on the "
           "prototypes (names, flags, descriptions) are in it as `annotations.json`; once the run is audited (Audit "
           "page), the audit is in it as `audit.json` (and comes back when the zip is uploaded again), and in the reports.")
if origin:
    st.caption(f"Model: {origin}. The run and the reports name it so; they hold no path of this server's "
               "workspace.")


@st.cache_data(max_entries=4, show_spinner=False)
def _run_zip(run_id: str, name: str, notes_key: str, _run, _notes, _audit) -> bytes:
    return report.run_zip_bytes(_run, name, notes=_notes, audit=_audit)


with S.user_errors():
    st.download_button("Download the run (.zip)",
                       data=_run_zip(entry.id, f"phpn-run-{stem}-k{run.k}", notes_key, run, notes, audit),
                       file_name=f"phpn-run-{stem}-k{run.k}.zip", mime="application/zip", key="dl_run",
                       type="primary")

st.header("Report for a class")
S.remember("export_class", options={"export_class": run.class_indices.tolist()})
cls = st.selectbox("Class", run.class_indices.tolist(), format_func=lambda i: f"{_name(i)} ({i})",
                   key="export_class")
S.memorise("export_class")


def _class_html(class_index: int) -> str:
    return report.class_report(run, class_index, image_root=S.image_root_for_run(run, class_index),
                               preprocess=model.session.preprocess, network=entry.network, notes=notes,
                               audit=audit)


if st.button("Build the class report", key="build_class_report"):
    with S.user_errors():
        with st.spinner("Drawing the report…"):
            with model.lock:
                st.session_state["class_report"] = (entry.id, cls, _class_html(int(cls)), notes_key)
built = st.session_state.get("class_report")
if built and built[0] == entry.id and built[1] == cls and built[3] == notes_key:
    st.download_button("Download the class report (.html)", data=built[2],
                       file_name=f"phpn-{stem}-{_slug(_name(cls))}.html", mime="text/html", key="dl_class")
    st.caption(f"{len(built[2]) / 1024:.0f} KB, one file with every image embedded.")

st.header("Report for an explanation")
explained = st.session_state.get("explained")
if not explained or explained.get("run_id") != entry.id:
    st.info("Explain an image first (Explain an image page); its explanation can then be downloaded here.")
else:
    e = explained["explanation"]
    st.write(f"Last explanation: **{explained['label']}** for class **{e.class_name}** (logit {e.logit:.3f}).")
    if st.button("Build the explanation report", key="build_expl_report"):
        with S.user_errors():
            html_text = report.explanation_report(e, run, image_root=S.image_root_for_run(run, e.class_index),
                                                  preprocess=model.session.preprocess,
                                                  opacity=explained.get("opacity", 0.6),
                                                  mode=explained.get("mode", "bicubic"),
                                                  image_name=explained["label"],
                                                  model_label=origin_words(recorded_model) or model.label,
                                                  run_label=S.shown_path(entry.saved_to) if entry.saved_to
                                                  else entry.origin, true_class=explained.get("true_class"),
                                                  notes=notes, audit=audit)
            st.session_state["explanation_report"] = (entry.id, explained["label"], e.class_index, html_text,
                                                      notes_key)
    built = st.session_state.get("explanation_report")
    if (built and built[0] == entry.id and built[1] == explained["label"] and built[2] == e.class_index
            and built[4] == notes_key):
        st.download_button("Download the explanation report (.html)", data=built[3],
                           file_name=f"phpn-{stem}-{_slug(explained['label'])}-{_slug(e.class_name)}.html",
                           mime="text/html", key="dl_expl")
        st.caption(f"{len(built[3]) / 1024:.0f} KB, one file with every image embedded.")
