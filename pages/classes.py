"""Class browser: a class's prototypes: their share of the score, what they look like (top
training patches, zoomed), where they respond on a few class images, which other classes
have similar prototypes, the expert's own notes on each, and what switching some off would
do (an edited model, marked as such)."""

import numpy as np
import pandas as pd
import streamlit as st

from phpn import config as D
from phpn.api import (
    EDITED_MODEL,
    SUGGESTED_FLAGS,
    conflict_text,
    label_heading,
    labelled_sets,
    prototype_labels,
    switch_off,
)
from phpn.app import frame as S
from phpn.config import MAP_OPACITY, class_name
from phpn.errors import ConfigError, DataError
from phpn.glossary import explain, fidelity_warning
from phpn.show import viz

S.frame()
st.title("Class browser")
entry = S.require_run()
model = S.current_model()
run, network, notes = entry.run, entry.network, entry.notes
names = run.class_names
classes = run.class_indices.tolist()
pre = model.session.preprocess
pre_key = S.preprocess_key(pre)


def _name(i: int) -> str:
    return class_name(names, i)


@st.cache_data(max_entries=64, show_spinner=False)
def _similar(run_id: str, class_index: int, top: int, _run) -> list:
    return viz.shared_parts(_run, class_index, top=top)


@st.cache_data(max_entries=64, show_spinner=False)
def _maps(run_id: str, class_index: int, paths: tuple, root: str, _entry, _network):
    with _entry.lock:
        pictures, maps, contrib, kept = viz.class_maps(_network, _entry.session.preprocess, root, paths, class_index)
    return [np.asarray(p) for p in pictures], maps, contrib, kept


@st.cache_data(max_entries=256, show_spinner=False)
def _overlay_row(run_id: str, class_index: int, proto: int, paths: tuple, opacity: float, outline: bool,
                 _pictures, _maps):
    color = viz.prototype_color(proto)
    tiles = [viz.prototype_overlay(viz.enlarge(p, 112), m[proto], opacity, colors=[color], outline=outline)
             for p, m in zip(_pictures, _maps)]
    scales = [viz.own_scale(m[proto]) for m in _maps]
    return np.asarray(viz.image_grid(tiles, columns=len(tiles))), scales


S.remember("browser_class", "browser_n_maps", "browser_opacity", "browser_outline", options={"browser_class": classes})
c_sel, c_opts = st.columns([3, 2])
class_index = c_sel.selectbox("Class (type to search)", classes, format_func=lambda i: f"{_name(i)} ({i})",
                              key="browser_class")
n_maps = c_opts.slider("Class images for the maps", 1, 8, 4, key="browser_n_maps")
opacity = c_opts.slider("Map opacity", 0.0, 1.0, MAP_OPACITY, 0.05, key="browser_opacity")
outline = c_opts.toggle("Outline each map's strongest region", value=False, key="browser_outline")
S.memorise("browser_class", "browser_n_maps", "browser_opacity", "browser_outline")
S.set_url(**{"class": int(class_index)})
with S.stop_on_error():  # the class's shard is read here (and every shard for an older run's shared parts)
    meta = run.class_meta(class_index)
    k = run.class_k(class_index)
    root = S.image_root_for_run(run, class_index)
    similar = _similar(entry.id, class_index, viz.SIMILAR_TOP, run)
colors = [viz.prototype_color(i) for i in range(k)]
labels = prototype_labels(notes, class_index, k)
shares = viz.contribution_shares(meta["mean_contribution"])

left, right = st.columns([3, 2])
with left:
    st.plotly_chart(viz.figure_contributions(meta["mean_contribution"], labels, colors,
                                             title=f"{_name(class_index)}: what each prototype adds to the score"),
                    key=f"contrib_{class_index}", config={"displayModeBar": False})
with right:
    st.markdown(f"**{_name(class_index)}** (class {class_index}) · {meta['images']} discovery images")
    if meta.get("k_reason"):
        if run.settings.get("auto_k"):  # --k auto chose it; --suggest-k only suggests one
            st.caption(f"k = {k}, chosen from NMF's error: {meta['k_reason']}.")
        else:
            st.caption(f"k = {k}; NMF's error suggests k = {meta['k_suggested']}: {meta['k_reason']}.")
    with st.popover("What do these words mean?", icon=":material/help:"):
        for term in ("prototype", "contribution", "logit", "share", "map", "fidelity", "top patches"):
            st.markdown(f"**{term.capitalize()}**: {explain(term)}")
    st.caption("A bar is a prototype's average contribution over the class's discovery images, with its share of "
               "the score (score − bias). Hatched bars subtract.")
    with st.expander("Expert details (α, residual, refinement objective)"):
        a, b = st.columns(2)
        a.metric("Residual ‖R‖/‖v‖", f"{meta['residual_ratio']:.3f}", help=explain("residual"))
        b.metric("Negative α", meta["negative_alpha"], help=explain("alpha"))
        a.metric("Objective before", f"{meta['objective_before']:.4g}", help=explain("objective"))
        b.metric("Objective after", f"{meta['objective_after']:.4g}", help=explain("objective"))
        st.caption("α per prototype: " + ", ".join(f"{lab}: {a_:.3g}" for lab, a_ in zip(labels, meta["alpha"])))

if root is None:
    st.warning("The training images of this run are not available here, so the patches and maps cannot be shown. "
               "Scan the image folder the run was made from on the Model & data page.")
paths = tuple(meta.get("paths", [])[:n_maps])
pictures, maps = [], None
if root is not None and paths:
    pictures, maps, contrib, kept = _maps(entry.id, class_index, paths, str(root), model, network)
if entry.notes_problem:
    st.warning(f"Notes are not saved: {entry.notes_problem}.")


def _notes_form(i: int) -> None:
    note = notes.get(class_index, i)
    custom = [f for f in note.flags if f not in SUGGESTED_FLAGS]
    with st.form(f"notes_{class_index}_{i}", border=False):
        a, b = st.columns([1, 2])
        name = a.text_input("Name", value=note.name, max_chars=80, placeholder="e.g. beak, wheel, sky",
                            key=f"notes_name_{class_index}_{i}")
        flags = b.multiselect("Flags", list(SUGGESTED_FLAGS) + custom, default=list(note.flags),
                              key=f"notes_flags_{class_index}_{i}")
        other = b.text_input("Another flag (your own word)", key=f"notes_other_{class_index}_{i}")
        description = st.text_area("Description", value=note.description, height=68,
                                   key=f"notes_desc_{class_index}_{i}")
        if note.last_edit():
            st.caption(f"Last {note.last_edit()}.")
        if st.form_submit_button("Save the note"):
            with S.user_errors():
                notes.editor = str(st.session_state.get("notes_editor") or "").strip() or None  # unnamed: unsigned
                notes.set(class_index, i, name=name, description=description,
                          flags=list(flags) + ([other] if other.strip() else []))
                why = S.save_notes(entry)  # merged per prototype with what others saved meanwhile
                S.flash("Note saved beside the run." if why is None else f"Note kept for this session; {why}.",
                        "success" if why is None else "warning", place=f"notes_{class_index}_{i}")
                clash = conflict_text(notes, names)
                if why is None and clash:
                    S.flash(clash, "warning", place=f"notes_{class_index}_{i}")
                st.rerun()
    S.show_flash(f"notes_{class_index}_{i}")


S.remember("notes_editor")
st.text_input("Your name, shown beside the notes you change (several people can annotate one run: each save "
              "keeps the others' notes)", key="notes_editor", max_chars=80)
S.memorise("notes_editor")
for i in range(k):
    with st.container(border=True):
        fid = meta["fidelity"][i]
        note = notes.get(class_index, i)
        flags = "".join(f" `{f}`" for f in note.flags)
        st.markdown(f"{viz.color_swatch(colors[i], 16)} **{label_heading(labels[i])}**{flags} &nbsp;·&nbsp; adds "
                    f"**{meta['mean_contribution'][i]:+.3f}** on average ({100 * shares[i]:.0f}% of the score) "
                    f"&nbsp;·&nbsp; map fidelity **{fid:.2f}**", unsafe_allow_html=True, help=explain("fidelity"))
        warning = fidelity_warning(fid)
        if warning:
            st.warning(warning, icon=":material/warning:")
        if note.description:
            st.caption(note.description)
        what, where = st.columns([1, 1])
        with what:
            st.markdown("*What*: its top training patches, boxed, each zoomed beside its image")
            if root is not None:
                grid = S.patch_grid(str(root), tuple((p["path"], tuple(p["box"])) for p in meta["top_patches"][i]),
                                    colors[i], pre_key, 96, 2)
                if grid is not None:
                    st.image(grid)
        with where:
            st.markdown("*Where*: on class images (its colour adds, grey hatching subtracts)")
            if len(pictures):
                row, scales = _overlay_row(entry.id, class_index, i, paths, float(opacity), bool(outline),
                                           pictures, maps)
                st.image(row, caption="Each picture on this prototype's own scale: full colour = "
                                      + ", ".join(f"{s:.3g}" for s in scales) + " (its largest |value| there)")
        shared = similar[i]  # already the shared parts only (phpn.config.shared_parts)
        if shared:
            items = " · ".join(f"{_name(s['class_index'])} {notes.label(s['class_index'], s['prototype'])} "
                               f"(cos {s['cosine']:.2f})" for s in shared)
            st.caption(f"Shared parts, similar prototypes of other classes: {items}")
        else:
            st.caption(f"Shared parts: {D.no_shared_parts()}.")
        with st.expander("Your notes: name, describe and flag this prototype"):
            _notes_form(i)

# --- switching prototypes off ------------------------------------------------------------------
st.header("Switch prototypes off")
st.caption("What the model would predict without some of this class's prototypes, on labelled images. "
           + explain("edited model"))
data = S.current_data()
sets = {s.choice: s for s in labelled_sets(data.explain_root if data is not None else None,
                                            data.data.root if data is not None else None,
                                            loaded_label=data.label if data is not None else "", run_root=run.data_info.get("root"),
                                            upload=False)}
with st.form(f"off_form_{class_index}"):
    a, b, c = st.columns([3, 2, 1])
    off = a.multiselect("Prototypes to switch off", list(range(k)), format_func=lambda i: labels[i],
                        key=f"off_protos_{class_index}")
    source = b.selectbox("Labelled images", list(sets), key="off_source",
                         help="The demo's held-out images, when there are, are the fair test: the prototypes were "
                              "not found on them.")
    per_class = c.number_input("Per class", 1, 200, 10, key="off_per_class")
    off_path = st.text_input("Folder path (for a labelled folder on this server)", key="off_path",
                             placeholder="/data/my-test-set")
    go = st.form_submit_button("Compare with the original model")
if go:
    with S.user_errors():
        if not off:
            raise ConfigError("No prototype picked.", "Pick at least one prototype to switch off.")
        chosen = sets[source]
        if chosen.root is not None:
            root, words = chosen.root, chosen.words
        else:
            if not off_path.strip():
                raise DataError("No folder given.", "Type the path of the labelled folder on this server.")
            root = S.visitor_path(off_path, "image folder")
            words = f"the labelled folder {S.shown_path(root)}"
        labelled = data.data if data is not None and root == data.data.root else S.scan_data(model, root, None, 0)
        with st.spinner("Predicting with and without those prototypes…"), model.lock:
            result = switch_off(network, labelled, pre, {int(class_index): list(off)},
                                images_per_class=int(per_class), measured_on=words,
                                on_discovery_images=chosen.discovery)
        st.session_state["switch_off"] = (entry.id, int(class_index), result)
stored = st.session_state.get("switch_off")
if stored and stored[0] == entry.id and stored[1] == int(class_index):
    result = stored[2]
    with st.container(border=True):
        st.warning(f"**{EDITED_MODEL}**", icon=":material/construction:")
        m1, m2, m3 = st.columns(3)
        m1.metric("Original model accuracy", f"{100 * result.original_accuracy:.1f}%",
                  help=explain("accuracy"))
        m2.metric("Edited model accuracy", f"{100 * result.edited_accuracy:.1f}%",
                  delta=f"{100 * result.accuracy_change:+.1f} points")
        m3.metric("Predictions changed", f"{len(result.changed)} of {result.images}")
        st.caption(result.summary(names, with_warning=False))
        if result.warning:
            st.warning(result.warning, icon=":material/warning:")
        if result.changed:
            st.dataframe(pd.DataFrame([{"image": ch["path"], "true class": _name(ch["true"]),
                                        "original model": _name(ch["original"]),
                                        "edited model": _name(ch["edited"])} for ch in result.changed]),
                         hide_index=True)
