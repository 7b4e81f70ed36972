"""The setup check and Check preprocessing as the pages show them: on Model & data as soon as a
model and labelled images are known, and on Discover before a run starts. The numbers and the
sentences come from :mod:`phpn.pipeline.preprocess_check`; this module keeps the results in
the session and offers the proposed setting (apply, undo)."""
from __future__ import annotations

from typing import Optional

import pandas as pd
import streamlit as st

from phpn.api import open_model
from phpn.app import frame as S
from phpn.app import serving
from phpn.config import CHECK_IMAGES_PER_CLASS
from phpn.pipeline.preprocess_check import SetupCheck, check_preprocessing, describe, setup_check

SETUP_KEY = "setup_check"


def _data_key(model, data) -> tuple:
    return (model.key, data.label, str(data.data.root), data.cap, data.seed)


def cached_setup_check(model, data) -> Optional[SetupCheck]:
    """The setup check of this model on these images, when it was made in this session."""
    done = st.session_state.get(SETUP_KEY)
    return done[1] if done and done[0] == _data_key(model, data) else None


def setup_check_for(model, data) -> Optional[SetupCheck]:
    """The setup check of this model on these images, made now (one pass over a labelled sample)
    unless this session made it already; None for a model phpn cannot decompose."""
    if model is None or data is None or not model.decomposable or not data.data.classes:
        return None
    found = cached_setup_check(model, data)
    if found is None:
        with S.user_errors(), st.spinner("Checking the model on a labelled sample of these images…"):
            with model.lock:
                found = setup_check(model.session, data.data)
            st.session_state[SETUP_KEY] = (_data_key(model, data), found)
    return found


def show_setup_check(check: Optional[SetupCheck]) -> None:
    """The check's verdict: a success line, or its warnings first (the fix is offered below them)."""
    if check is None:
        return
    if check.ok:
        st.success("**Setup check.** " + check.summary(), icon=":material/check_circle:")
        return
    body = "\n\n".join(check.warnings())
    if not check.near_chance:
        body = check.summary() + "\n\n" + body
    st.warning("**Setup check: fix this before discovering.** " + body
               + "\n\nCheck preprocessing below tries the usual input sizes, normalisations and colours on these "
                 "images and proposes one only when it beats the setting in use beyond chance.",
               icon=":material/warning:")


def apply_preprocessing(model, pre) -> None:
    """Use ``pre`` for this session: the same model, diagnosed again at that input; the images
    stay, the run made with the old setting is put aside. Undo brings all of it back."""
    before, images, run = model, S.current_data(), S.current_run()
    spec = {k: v for k, v in before.spec.items() if k != "overrides"}
    if serving.jailed_worker(before.session) is not None:  # a visitor's code: diagnosed again in its jail
        session = S.load_model_entry(**{**spec, "preprocess": pre.to_dict()}).session
    else:
        serving.check_forward_cost(pre.crop, pre.crop, before.cost)  # the operator's budget, before it runs there
        with before.lock:  # the loaded model is shared with the entry it came from
            session = open_model(before.session, preprocess=pre, feature_layer=spec.get("feature_layer"),
                                 head_layer=spec.get("head_layer"))
    entry = S.ModelEntry(session=session, key=f"{before.key} | preprocessing {sorted(pre.to_dict().items())}",
                         label=before.label, lock=before.lock, cost=before.cost,
                         spec={**spec, "preprocess": pre.to_dict()} if spec else {})
    S.set_model(entry)
    if images is not None:
        S.set_data(images)
    st.session_state["preprocess_applied"] = {"key": entry.key, "before": before, "data": images, "run": run,
                                              "was": describe(before.session.preprocess), "now": describe(pre)}


def undo_preprocessing(applied: dict) -> None:
    S.set_model(applied["before"])
    if applied["data"] is not None:
        S.set_data(applied["data"])
    if applied["run"] is not None:
        st.session_state["run"] = applied["run"]
    st.session_state.pop("preprocess_applied", None)


def applied_preprocessing_banner(model, running: bool) -> None:
    applied = st.session_state.get("preprocess_applied")
    if applied is None:
        return
    if applied["key"] != model.key:  # another model was loaded since
        st.session_state.pop("preprocess_applied", None)
        return
    st.info(f"Preprocessing for this session: **{applied['now']}**, set by Check preprocessing (it was "
            f"{applied['was']}). Discover again to make a run with it"
            + ("; the run made with the old setting is put aside." if applied["run"] is not None else "."),
            icon=":material/tune:")
    if st.button("Undo: back to the old setting", key="check_pre_undo", disabled=running):
        undo_preprocessing(applied)
        st.rerun()


def check_preprocessing_section(model, data, running: bool, expanded: bool) -> None:
    """The expander with Check preprocessing: the ranked settings, the proposal and its evidence,
    and the button that applies it."""
    applied_preprocessing_banner(model, running)
    with st.expander("Check preprocessing: does the model read these images?", expanded=expanded,
                     icon=":material/tune:"):
        st.caption(f"In use: {describe(model.session.preprocess)}. The check runs the model on labelled images of "
                   "each class with the usual input sizes (with and without a centre crop), normalisations and "
                   "colours, and compares each with the setting in use on the same images. A change is proposed only "
                   "when it wins beyond chance, allowing for the number of settings tried; with few images per class "
                   "nothing can be.")
        per_class = st.number_input("Images per class", 1, 200, CHECK_IMAGES_PER_CLASS, key="check_pre_images")
        if st.button("Check preprocessing", key="check_pre", disabled=running):
            with S.user_errors():
                bar = st.progress(0.0, text="Trying settings…")
                with model.lock:
                    check = check_preprocessing(
                        model.session, data.data, images_per_class=int(per_class),
                        progress=lambda _s, d, t: bar.progress(min(1.0, d / max(t, 1)), text=f"Settings tried: {d}"))
                bar.empty()
                st.session_state["preprocess_check"] = (model.key, check)
        done = st.session_state.get("preprocess_check")
        if done and done[0] == model.key:
            check = done[1]
            (st.warning if check.improves or check.best_near_chance else st.success)(check.proposal())
            if check.evidence():
                st.caption(check.evidence())
            if check.improves and st.button(f"Apply this setting: {describe(check.best.preprocess)}",
                                            key="check_pre_apply", type="primary", disabled=running,
                                            help="Uses it for this session (the model is diagnosed again at this "
                                                 "input; the images stay). Undo is offered above."):
                with S.user_errors():
                    apply_preprocessing(model, check.best.preprocess)
                    st.rerun()
            st.dataframe(pd.DataFrame(check.table()), hide_index=True,
                         column_config={"accuracy": st.column_config.NumberColumn(format="percent")})
