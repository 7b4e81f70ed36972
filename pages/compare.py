"""Compare: the current run against another saved run (another seed, another k, another model on
the same classes, a fine-tuned model), class by class: prototypes matched one-to-one, the
similarity of each pair, the unmatched ones, and what changed in the contributions. The numbers
come from phpn.pipeline.compare (the same as ``phpn compare`` and ``phpn.compare``)."""
import json
from pathlib import Path

import pandas as pd
import streamlit as st

from phpn.api import (
    BASELINE,
    MATCH_THRESHOLD,
    PATCH_OVERLAP,
    SIMILARITY,
    check_comparable,
    compare_runs,
    missing_model,
    open_run,
)
from phpn.api import COMPARE_IMAGES_PER_CLASS as IMAGES_PER_CLASS
from phpn.api import read_run as load_run
from phpn.app import frame as S
from phpn.errors import DataError

S.frame()
st.title("Compare two runs")
entry = S.require_run()
model = S.current_model()
data = S.current_data()
run = entry.run

st.caption(f"Each class's prototypes of the two runs are paired one-to-one (the Hungarian method) on one stated "
           f"similarity, which holds for any two models: {SIMILARITY}. Where both "
           "runs decompose the same model, the cosine of the prototype vectors is shown too. A pair below the "
           "threshold is no match: both prototypes are listed as unmatched. A second piece of evidence from the "
           f"runs' own records: the top-patch overlap, the {PATCH_OVERLAP}. Each number is shown beside its "
           f"baseline: {BASELINE}.")

known = S.known_runs()
choice = st.selectbox("The other run", ["(type a path below)"] + [label for label, _ in known], key="compare_choice")
typed = st.text_input("Run folder path", key="compare_path")
c1, c2 = st.columns(2)
per_class = c1.number_input("Images per class", min_value=2, max_value=200, value=IMAGES_PER_CLASS, key="compare_cap")
threshold = c2.number_input("Threshold", min_value=-1.0, max_value=1.0, value=MATCH_THRESHOLD, step=0.05,
                            key="compare_threshold")

if st.button("Compare", type="primary", key="compare_go"):
    with S.user_errors():
        path = typed.strip() or (choice if not choice.startswith("(") else "")
        if not path:
            raise DataError("No run folder given.", "Pick one of the runs found or type the folder's path.")
        folder = S.run_folder(path)
        other = load_run(folder)
        check_comparable(run, other)  # before a model is loaded
        if other.checkpoint_sha256 == model.session.loaded.sha256:
            session = model.session
        else:
            spec = S.model_spec_of_run(other)
            if spec is None:
                raise missing_model(other, where="on this server for you")
            session = S.load_model_entry(**spec).session  # cached, as the Model & data page loads it
        other = open_run(folder, session)
        if data is None:
            raise DataError("No labelled images are loaded.", "Load an image folder on the Model & data page.")
        bar = st.progress(0.0, text="Comparing…")
        with S.stop_on_error():
            result = compare_runs(run, model.session.split, model.session.preprocess, other, session.split,
                                  session.preprocess, data.data, images_per_class=int(per_class),
                                  threshold=float(threshold), labels=("this run", Path(folder).name),
                                  progress=lambda _s, done, total: bar.progress(done / max(total, 1),
                                                                                text=f"Comparing: {done}/{total}"))
        bar.empty()
        st.session_state["compare_result"] = (entry.id, result)

stored = st.session_state.get("compare_result")
if stored and stored[0] == entry.id:
    result = stored[1]
    st.info(result.summary)
    for note in result.notes:
        st.caption(note)
    for c in result.classes:
        unmatched = len(c["unmatched_a"]) + len(c["unmatched_b"])
        with st.expander(f"{c['class_name']}: {len(c['pairs'])} pairs, {unmatched} unmatched; mean logit "
                         f"{c['mean_logit_a']:+.3f} → {c['mean_logit_b']:+.3f}", expanded=unmatched > 0):
            st.caption(result.baseline_text(c)[:1].upper() + result.baseline_text(c)[1:])
            rows = [{"prototype (this run)": p["a"] + 1, f"prototype ({result.labels[1]})": p["b"] + 1,
                     "similarity": round(p["similarity"], 3),
                     "cosine": None if p["cosine"] is None else round(p["cosine"], 3),
                     "top-patch overlap": None if p["patch_overlap"] is None else round(p["patch_overlap"], 3),
                     "contribution (this run)": round(p["contribution_a"], 3),
                     f"contribution ({result.labels[1]})": round(p["contribution_b"], 3)} for p in c["pairs"]]
            rows += [{"prototype (this run)": u["prototype"] + 1, f"prototype ({result.labels[1]})": None,
                      "similarity": u["best_similarity"], "cosine": None, "top-patch overlap": None,
                      "contribution (this run)": round(u["contribution"], 3)} for u in c["unmatched_a"]]
            rows += [{"prototype (this run)": None, f"prototype ({result.labels[1]})": u["prototype"] + 1,
                      "similarity": u["best_similarity"], "cosine": None, "top-patch overlap": None,
                      f"contribution ({result.labels[1]})": round(u["contribution"], 3)} for u in c["unmatched_b"]]
            st.dataframe(pd.DataFrame(rows), hide_index=True)
    st.download_button("Download the comparison (.json)", data=json.dumps(result.to_dict(), indent=1),
                       file_name="phpn-compare.json", mime="application/json", key="dl_compare")
