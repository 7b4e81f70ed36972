"""Evaluate: phpn.evaluate.evaluate_run on the current run and images: exactness and the
attribution axioms, deletion curves (faithfulness), and with part annotations consistency
and stability (Huang et al., ICCV 2023)."""
import json

import pandas as pd
import streamlit as st
import torch

from phpn.app import frame as S
from phpn.errors import DataError
from phpn.evaluate import evaluate_run
from phpn.glossary import explain
from phpn.show import viz

S.frame()
st.title("Evaluate")
entry = S.require_run()
model = S.current_model()
data = S.current_data()
run = entry.run

st.caption("Exactness (the decomposed logits against the model's), completeness (contributions sum to logit − bias), "
           "linearity, deletion curves (masking a prototype's top region should lower its own contribution more "
           "than masking a random region), and, given a part-annotated dataset in the CUB-200-2011 layout, "
           "consistency and stability.")

default_root = str(data.data.root) if data is not None else ""
with st.form("evaluate_form"):
    data_root = st.text_input("Image folder (one sub-folder per class)", value=default_root, key="eval_root")
    parts_root = st.text_input("Part-annotated dataset, CUB-200-2011 layout (optional)", key="eval_parts")
    c1, c2, c3 = st.columns(3)
    per_class = c1.number_input("Images per class (exactness)", 1, 100, 8, key="eval_per_class")
    deletion = c2.checkbox("Deletion curves", value=True, key="eval_deletion")
    del_per_class = c3.number_input("Images per class (deletion)", 1, 50, 4, key="eval_del_per_class")
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    device = c1.selectbox("Device", devices, key="eval_device")
    baselines = st.multiselect("Also score (consistency/stability baselines)", ["nmf", "random", "equal"],
                               key="eval_baselines")
    go = st.form_submit_button("Evaluate", type="primary")

if go:
    with S.user_errors():
        if not data_root.strip() and not parts_root.strip():
            raise DataError("No images to evaluate on.", "Give an image folder and/or a part-annotated dataset.")
        bar = st.progress(0.0, text="Starting…")

        def progress(stage, done, total):
            bar.progress(min(1.0, done / total) if total else 0.0, text=f"{stage}: {done}/{total}")

        session = model.session_for(device)
        result = evaluate_run(run, session.split, session.preprocess,
                              S.visitor_path(data_root, "image folder") if data_root.strip() else None,
                              S.visitor_path(parts_root, "part-annotated dataset") if parts_root.strip() else None,
                              images_per_class=int(per_class), deletion=bool(deletion),
                              deletion_images_per_class=int(del_per_class), baselines=tuple(baselines),
                              device=device, progress=progress)
        bar.progress(1.0, text=f"Done in {result.get('seconds', 0):.1f} s")
        st.session_state["evaluation"] = (entry.id, result)

stored = st.session_state.get("evaluation")
if stored and stored[0] == entry.id:
    res = stored[1]
    summary = res.get("summary", {})
    ex = res.get("exactness", {})
    st.header("Exactness and axioms")
    (st.success if ex.get("passed") else st.error)(
        f"**{'Exact' if ex.get('passed') else 'Not exact'}** on {ex.get('images', 0)} images "
        f"(tolerance {ex.get('tolerance', 0):.2g}).")
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Top-1 agreement", f"{ex.get('top1_agreement', 0):.2f}%", help=explain("agreement"))
    c2.metric("Max |Δ logit|", f"{ex.get('max_abs_logit_diff', 0):.2g}")
    c3.metric("Completeness error", f"{ex.get('completeness_max_error', 0):.2g}",
              help="max |Σ contributions + bias − logit|: how far the prototypes' contributions and the bias are "
                   "from adding up to the model's score (0 up to rounding). " + explain("contribution"))
    lin = ex.get("linearity_max_error")
    c4.metric("Linearity error", "—" if lin is None else f"{lin:.2g}")

    deletion_res = res.get("deletion") or {}
    ds = deletion_res.get("summary") or {}
    if ds:
        st.header("Faithfulness: deletion curves")
        d1, d2 = st.columns(2)
        d1.metric("Mean own-contribution gap (top − random)", f"{ds.get('mean_own_gap', 0):.3f}")
        d2.metric("Prototypes with a positive gap", f"{ds.get('prototypes_with_positive_gap', 0):.0f}%")
        curves = [{"name": "own contribution, top region masked", "fractions": ds["fractions"],
                   "values": ds["own_drop_top_relative"]},
                  {"name": "own contribution, random region masked", "fractions": ds["fractions"],
                   "values": ds["own_drop_random_relative"]}]
        st.plotly_chart(viz.figure_deletion(curves, title="Drop of a prototype's own contribution "
                                                          "(relative to its mean |contribution|)"),
                        key="deletion_fig", config={"displayModeBar": False})

    interp = res.get("interpretability") or {}
    if interp:
        st.header("Consistency and stability")
        rows = []
        for name, v in interp.items():
            row = {"prototypes": name, "consistency %": v.get("consistency")}
            for key, val in (v.get("stability") or {}).items():
                row[f"stability ({key}) %"] = val
            rows.append(row)
        st.dataframe(pd.DataFrame(rows), hide_index=True)
        st.plotly_chart(viz.figure_bars({r["prototypes"]: r["consistency %"] for r in rows},
                                        title="Consistency (%)", ytitle="%"), key="consistency_fig",
                        config={"displayModeBar": False})
    else:
        st.caption("Consistency and stability need a part-annotated dataset (CUB-200-2011 layout).")
    st.download_button("Download the evaluation (.json)", data=json.dumps(res, indent=1),
                       file_name="phpn-evaluation.json", mime="application/json", key="dl_eval")
