"""Audit: every prototype of the run ranked by how much a person should look at it first, with its
reasons in words and every signal beside the baselines of the same run. The numbers come from
phpn.pipeline.audit (the same as ``phpn audit`` and ``run.audit()``). The expert confirms a finding
("spurious", "background") or dismisses it in the run's notes, and sees the accuracy with the
prototypes confirmed spurious switched off."""
import json
from pathlib import Path

import pandas as pd
import streamlit as st

from phpn.api import AUDIT_IMAGES_PER_CLASS as IMAGES_PER_CLASS
from phpn.api import (
    DISMISSED,
    NO_SINGLE_REASON,
    NOT_JUDGED,
    REASON_EXCESS,
    SERVER_FOLDER,
    SIGNALS,
    VERDICTS,
    audit_run,
    keep_audit,
    labelled_sets,
    prototype_label,
    saved_audit,
    switch_off,
    verdict_words,
)
from phpn.app import frame as S
from phpn.app import serving
from phpn.config import class_name
from phpn.errors import DataError
from phpn.show.report import audit_json

S.frame()
st.title("Audit")
entry = S.require_run()
model = S.current_model()
data = S.current_data()
run = entry.run
notes = entry.notes

st.caption("Is the model right for the right reasons? Each prototype is tested for what a shortcut (a watermark, a "
           "ruler, a border artefact) leaves behind: its map always peaks at the same place, its top patches look "
           "alike, it fires on every class, pasting its highest-map region onto other classes' images turns them "
           "into its class, blurring that region on its own class's images loses the prediction, switching it off "
           "changes the class's predictions. Each signal is measured in spreads above prototypes that also sum to "
           "the head row but carry no discovered part (random directions; the equal split is shown too). The score "
           "adds these excesses; a prototype stands out when it scores above every random-direction prototype; a "
           f"signal {REASON_EXCESS:g} spreads above is given as a reason.")

sets = {s.choice: s for s in labelled_sets(data.explain_root if data is not None else None,
                                            data.data.root if data is not None else None,
                                            loaded_label=data.label if data is not None else "", run_root=run.data_info.get("root"),
                                            upload=False)}
source = st.radio("Labelled images", list(sets), horizontal=True, key="audit_source")
folder_path = ""
if source == SERVER_FOLDER:
    folder_path = st.text_input("Folder path", key="audit_path", placeholder="/data/my-test-set")
per_class = st.number_input("Images per class", min_value=2, max_value=200, value=IMAGES_PER_CLASS, key="audit_cap")

if st.button("Audit the prototypes", type="primary", key="audit_go"):
    with S.user_errors():
        chosen = sets[source]
        if chosen.root is not None:
            root, words = chosen.root, chosen.words
        else:
            if not folder_path.strip():
                raise DataError("No folder given.", "Type the path of the labelled folder on this server.")
            root = S.visitor_path(folder_path, "image folder")
            words = f"the labelled folder {S.shown_path(root)}"
        folder = S.scan_data(model, root, int(per_class), 0)
        bar = st.progress(0.0, text="Auditing…")
        with S.stop_on_error():
            result = audit_run(run, model.session.split, model.session.preprocess, folder,
                               images_per_class=int(per_class),
                               progress=lambda _s, done, total: bar.progress(done / max(total, 1),
                                                                             text=f"Auditing: class {done}/{total}"))
        bar.empty()
        # Kept beside the run (audit.json) where this visitor may write it; the findings stay either way.
        unwritable = serving.read_only_reason(entry.saved_to) if entry.saved_to else None
        if unwritable:
            result.save_note = f"The audit is not kept beside the run: {unwritable}"
        else:
            keep_audit(run, result)
        st.session_state["audit_result"] = (entry.id, result)
        st.session_state["audit_images"] = (entry.id, str(root), int(per_class), words, chosen.discovery)

stored = st.session_state.get("audit_result")
if not (stored and stored[0] == entry.id) and entry.saved_to:
    kept = saved_audit(run)  # the last audit kept beside the run, when it is this run's
    if kept is not None and kept.audit is not None:
        stored = st.session_state["audit_result"] = (entry.id, kept.audit)
        st.info(f"The last audit of this run, kept beside it on {kept.saved_at[:16].replace('T', ' ')} UTC. "
                "Audit again to measure it anew.")
        if kept.audit.data_root and Path(kept.audit.data_root).is_dir():
            st.session_state["audit_images"] = (entry.id, kept.audit.data_root, kept.audit.images_per_class,
                                                 f"the images of the last audit ({kept.audit.data_root})", False)
    elif kept is not None:
        st.warning(kept.note)
if stored and stored[0] == entry.id:
    audit = stored[1]
    (st.warning if audit.stands_out else st.success)(audit.summary)
    st.caption(f"{audit.images} labelled images, up to {audit.images_per_class} per class."
               + (f" Kept beside the run ({Path(audit.saved_to).name})." if getattr(audit, "saved_to", None) else "")
               + (f" {audit.save_note}" if getattr(audit, "save_note", None) else ""))
    def _who(e) -> str:
        return f"{e.class_name}, {prototype_label(notes, e.class_index, e.prototype)}"

    def _verdict(e):
        return notes.verdict(e.class_index, e.prototype) if notes is not None else None

    rows = [{"rank": i + 1, "class": e.class_name, "prototype": e.prototype + 1, "score": round(e.score, 2),
             "stands out": "yes" if e.stands_out else "", "reasons": " · ".join(r.split(":", 1)[0] for r in e.reasons),
             "expert's verdict": verdict_words(_verdict(e))}
            for i, e in enumerate(audit.entries)]
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="audit_table")
    for i, e in enumerate(audit.entries[:5]):  # the first five, beside their baselines
        verdict = _verdict(e)
        with st.expander(f"{i + 1}. {_who(e)} (score {e.score:.2f})"
                         + ("" if verdict is None else f" · {verdict_words(verdict)}"),
                         expanded=i == 0 and verdict != DISMISSED):
            if verdict == DISMISSED:
                st.caption("Dismissed in your notes: looked at, and judged not a shortcut.")
            for reason in e.reasons or [NO_SINGLE_REASON]:
                st.markdown(f"- {reason}")
            table = [{"signal": SIGNALS[name][0], "value": round(s["value"], 3),
                      "spread over images": None if s["spread"] is None else round(s["spread"], 3),
                      "random directions (mean ± sd)": f"{s['random']:.3f} ± {s['random_sd']:.3f}",
                      "equal split": round(s["equal"], 3), "excess (spreads)": round(s["excess"], 2)}
                     for name, s in e.signals.items()]
            st.dataframe(pd.DataFrame(table), hide_index=True)
    st.download_button("Download the audit (.json)", data=json.dumps(audit_json(audit, notes), indent=1),
                       file_name="phpn-audit.json", mime="application/json", key="dl_audit")

    st.subheader("Your verdict")
    st.caption("Confirm a finding (a spurious shortcut, or the background) or dismiss it. The verdict is a flag "
               "in the run's notes, as on the Class browser: it goes into the class and explanation reports and "
               "the run's zip (Export page).")
    if entry.notes_problem:
        st.warning(f"Notes are not saved: {entry.notes_problem}.")
    choices = [*VERDICTS, DISMISSED, NOT_JUDGED]
    with st.form("audit_verdict_form"):
        a, b = st.columns([3, 2])
        pick = a.selectbox("Prototype", list(range(len(audit.entries))), key="audit_pick",
                           format_func=lambda i: f"{i + 1}. {_who(audit.entries[i])}")
        choice = b.radio("Verdict", choices, horizontal=True, key="audit_verdict")
        if st.form_submit_button("Save the verdict"):
            with S.user_errors():
                e = audit.entries[int(pick)]
                notes.set_verdict(e.class_index, e.prototype, None if choice == NOT_JUDGED else choice)
                why = S.save_notes(entry)
                S.flash(f"{_who(e)}: {verdict_words(_verdict(e))}. "
                        + ("Saved beside the run." if why is None else f"Kept for this session; {why}."),
                        "success" if why is None else "warning", place="audit_verdict")
                st.rerun()
    S.show_flash("audit_verdict")

    st.subheader("Without the spurious prototypes")
    off = notes.spurious_off() if notes is not None else {}
    if not off:
        st.caption("No prototype is confirmed spurious yet. Once some are, the model's accuracy with them "
                   "switched off is measured here on the audited images.")
    else:
        st.caption("Switched off: " + "; ".join(
            f"{class_name(run.class_names, c)}: " + ", ".join(prototype_label(notes, c, i) for i in p)
            for c, p in off.items()) + ".")
        images = st.session_state.get("audit_images")
        if images is None or images[0] != entry.id:
            st.caption("Audit again to measure the accuracy on labelled images.")
        elif st.button("Accuracy without the spurious prototypes", key="audit_switch_off"):
            with S.user_errors():
                folder = S.scan_data(model, Path(images[1]), images[2], 0)
                with st.spinner("Predicting with and without those prototypes…"), model.lock:
                    done = switch_off(entry.network, folder, model.session.preprocess, off,
                                      images_per_class=images[2], measured_on=images[3],
                                      on_discovery_images=images[4])
                st.session_state["audit_switched_off"] = (entry.id, json.dumps(off), done)
        stored_off = st.session_state.get("audit_switched_off")
        if stored_off and stored_off[0] == entry.id and stored_off[1] == json.dumps(off):
            st.warning(stored_off[2].summary(run.class_names), icon=":material/construction:")
