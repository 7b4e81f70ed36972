"""Mistakes first: a labelled test folder through the model, its mistakes before its successes,
the most frequent confusions, and "why A and not B" on one image: both classes' prototypes
side by side and the logit gap as a waterfall. Every number comes from phpn.pipeline.mistakes."""

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from phpn.api import (
    LOADED_IMAGES,
    SERVER_FOLDER,
    UPLOADED_FOLDER,
    chance_warning,
    confusion_pick,
    contrast_image,
    labelled_sets,
    predict_folder,
)
from phpn.app import frame as S
from phpn.app.uploads import MAX_ZIP_BYTES, unpack_uploaded_zip
from phpn.config import class_name
from phpn.errors import DataError
from phpn.show import viz
from phpn.show.pictures import in_model_colours

S.frame()
st.title("Mistakes first")
entry = S.require_run()
model = S.current_model()
run, network = entry.run, entry.network
data = S.current_data()
names = run.class_names  # the model's names, or the class folders' that the run recorded
pre_key = S.preprocess_key(model.session.preprocess)


CONTRAST_PATCHES = 2  # top training patches under each prototype of "why A and not B" (the Class browser has all)


def _name(i: int) -> str:
    return class_name(names, i)


warning = chance_warning(run.recorded_certificate)
if warning:
    st.error(warning, icon=":material/warning:")

# --- which labelled folder ------------------------------------------------------------------------
st.caption("A labelled folder: one sub-folder of images per class, matched to the model's classes as on the "
           "Model & data page. Each image's folder is its true class.")
sets = {s.choice: s for s in labelled_sets(data.explain_root if data is not None else None,
                                            data.data.root if data is not None else None)}
options = list(sets)
S.remember("mistakes_source", "mistakes_cap", options={"mistakes_source": options})
source = st.radio("Test images", options, horizontal=True, key="mistakes_source")
zip_file, folder_path = None, ""
if source == UPLOADED_FOLDER:
    zip_file = st.file_uploader("Zip of the labelled folder", type=["zip"], key="mistakes_zip")
elif source == SERVER_FOLDER:
    folder_path = st.text_input("Folder path", key="mistakes_path", placeholder="/data/my-test-set")
cap = st.number_input("Images per class (0: all)", min_value=0, value=20, step=10, key="mistakes_cap")
S.memorise("mistakes_source", "mistakes_cap")

if st.button("Predict the folder", type="primary", key="mistakes_predict"):
    with S.user_errors():
        if sets[source].root is not None:
            root, label = sets[source].root, (data.label if source == LOADED_IMAGES else sets[source].words)
        elif source == UPLOADED_FOLDER:

            if zip_file is None:
                raise DataError("No zip uploaded.", "Choose a .zip of the labelled folder first.")
            ws = S.workspace()
            ws.check_room(int(zip_file.size), "This zip file")
            with st.spinner("Unpacking…"):
                root = unpack_uploaded_zip(zip_file, ws.new_upload_dir(), max_bytes=min(MAX_ZIP_BYTES, ws.room()))
            label = zip_file.name
        else:
            if not folder_path.strip():
                raise DataError("No folder given.", "Type the path of the labelled folder on this server.")
            root = S.visitor_path(folder_path, "image folder")
            label = S.shown_path(root)
        with st.spinner("Scanning the class folders…"):
            folder = S.scan_data(model, root, int(cap) or None, 0)
        bar = st.progress(0.0, text="Predicting…")
        found = predict_folder(model.session, folder,
                               progress=lambda _s, done, total: bar.progress(done / max(total, 1),
                                                                             text=f"Predicting: {done}/{total}"))
        bar.empty()
        st.session_state["mistakes"] = {"found": found, "label": label, "model_key": model.key}
        st.session_state.pop("mistakes_pick", None)

result = st.session_state.get("mistakes")
if not result or result.get("model_key") != model.key:
    st.info("Pick a labelled folder and press **Predict the folder**.")
    st.stop()
found = result["found"]

# --- the summary -------------------------------------------------------------------------------------
st.header(f"Test images: {result['label']}")
m1, m2, m3 = st.columns(3)
m1.metric("Model accuracy", f"{100 * (found.accuracy or 0):.1f}%", help="The original model's predictions against "
          "the folders' classes.")
m2.metric("Images", found.images)
m3.metric("Mistakes", found.images - found.correct)
st.write(found.summary())
folder_warning = chance_warning({"labelled_images": found.images, "correct": found.correct,
                                 "labelled_classes": len({p.true_class for p in found.predictions})})
if folder_warning and not warning:
    st.error(folder_warning, icon=":material/warning:")
order_hint = found.class_order_hint()
if order_hint:
    st.error(order_hint, icon=":material/swap_horiz:")
if found.skipped:
    st.caption(f"{len(found.skipped)} files could not be read and were left out.")

c1, c2 = st.columns(2)
with c1:
    st.subheader("Most frequent confusions")
    confusions = found.confusions(top=10)
    if confusions:
        st.dataframe(pd.DataFrame([{"true class": c["true_name"], "taken for": c["predicted_name"], "images": c["count"],
                                    "share of the class": c["share"]} for c in confusions]), hide_index=True,
                     column_config={"share of the class": st.column_config.NumberColumn(format="percent")})
    else:
        st.success("No mistakes on these images.")
with c2:
    st.subheader("Accuracy per class (worst first)")
    st.dataframe(pd.DataFrame([{"class": r["name"], "images": r["images"], "right": r["correct"],
                                "accuracy": r["accuracy"]} for r in found.per_class()]), hide_index=True,
                 column_config={"accuracy": st.column_config.NumberColumn(format="percent")})

# --- the confusion matrix: a cell opens its story ---------------------------------------------------------
matrix_classes, counts = found.confusion_matrix()


def _matrix_figure(classes: list, counts) -> object:
    """Rows: the true class; columns: the prediction; colour: the share of the true class's
    images. A clear square sits on each cell, since Plotly heatmaps report no click (a
    scatter does)."""
    import plotly.graph_objects as go  # noqa: PLC0415 - optional dependency

    n = len(classes)
    labels = [found.name(c) for c in classes]
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    where = [(i, j) for i in range(n) for j in range(n)]
    side = max(260, min(760, 34 * n + 160))
    cell = (side - 160) / max(n, 1)
    fig = go.Figure([
        go.Heatmap(z=shares.tolist(), x=list(range(n)), y=list(range(n)), text=counts.tolist(), texttemplate="%{text}",
                   colorscale="Blues", zmin=0, zmax=1, showscale=False, hoverinfo="skip"),
        go.Scatter(x=[j for _, j in where], y=[i for i, _ in where], mode="markers",
                   customdata=[[classes[i], classes[j]] for i, j in where],
                   hovertext=[f"{labels[i]} taken for {labels[j]}: {counts[i, j]} images" if i != j else
                              f"{labels[i]} right: {counts[i, j]} images" for i, j in where],
                   hoverinfo="text", marker={"symbol": "square", "size": max(6.0, 0.9 * cell),
                                             "color": "rgba(0,0,0,0)"},
                   selected={"marker": {"color": "rgba(230,60,40,0.35)"}},
                   unselected={"marker": {"opacity": 1}}, showlegend=False),
    ])
    axis = {"tickmode": "array", "tickvals": list(range(n)), "ticktext": labels, "showgrid": False, "zeroline": False}
    fig.update_layout(height=side, margin={"l": 10, "r": 10, "t": 30, "b": 10}, clickmode="event+select",
                      xaxis={**axis, "title": "predicted", "side": "top"},
                      yaxis={**axis, "title": "true class", "autorange": "reversed"})
    return fig


def _open_cell() -> None:
    """A clicked cell picks the image and the two classes of "why A and not B", the state the
    gallery's "Why?" buttons and the A/B boxes set too."""
    cell = confusion_pick(st.session_state["mistakes_matrix"].selection.points, matrix_classes)
    opened = found.open_cell(*cell) if cell is not None else None
    if opened is not None:
        example, class_a, class_b = opened
        st.session_state["mistakes_pick"] = example.path
        st.session_state[f"contrast_a_{example.path}"] = class_a
        st.session_state[f"contrast_b_{example.path}"] = class_b


st.subheader("Confusion matrix")
st.caption("Each row is a true class, each column what the model predicted; the number is how many images. "
           "Click a cell to see why the model took those images for that class."
           + (f" Shown: the {len(matrix_classes)} classes in the most mistakes." if
              len(matrix_classes) < len({c for p in found.predictions for c in (p.true_class, p.predicted)}) else ""))
st.plotly_chart(_matrix_figure(matrix_classes, counts), key="mistakes_matrix", on_select=_open_cell,
                selection_mode="points", config={"displayModeBar": False})

# --- the gallery ----------------------------------------------------------------------------------------
st.subheader("Gallery: mistakes first")
only_mistakes = st.toggle("Mistakes only", value=False, key="mistakes_only")
ordered = found.mistakes_first()
shown = [p for p in ordered if not p.correct] if only_mistakes else ordered
per_page = 24
pages = max(1, (len(shown) + per_page - 1) // per_page)
page = st.number_input("Page", 1, pages, 1, key="mistakes_page") if pages > 1 else 1
columns = st.columns(6)
for i, p in enumerate(shown[(page - 1) * per_page: page * per_page]):
    with columns[i % 6]:
        seen = S.seen_image(str(found.root / p.path), pre_key)
        if seen is not None:
            st.image(viz.enlarge(in_model_colours(Image.fromarray(seen), model.session.preprocess), 112),
                     width=112)
        mark = ":green[✓ right]" if p.correct else ":red[✗ wrong]"
        st.markdown(f"{mark} · true **{found.name(p.true_class)}**  \npredicted **{found.name(p.predicted)}** "
                    f"({100 * p.confidence:.0f}%)")
        if st.button("Why?", key=f"why_{p.path}"):
            st.session_state["mistakes_pick"] = p.path

# --- why A and not B ------------------------------------------------------------------------------------
pick = next((p for p in found.predictions if p.path == st.session_state.get("mistakes_pick")), None)
if pick is None:
    pick = ordered[0] if ordered else None
if pick is None:
    st.stop()
decomposed = sorted(int(c) for c in run.class_indices.tolist())
st.header("Why A and not B?")
st.caption(f"Image `{pick.path}`: labelled **{found.name(pick.true_class)}**, predicted "
           f"**{found.name(pick.predicted)}** ({'right' if pick.correct else 'a mistake'}).")
default_a, default_b = pick.contrast
if default_a not in decomposed or default_b not in decomposed:
    st.info("Both classes need prototypes in this run; pick two classes that were decomposed.")
a1, a2 = st.columns(2)
# The boxes' state is the one source of truth (the matrix and the "Why?" buttons set it): filled
# with the image's own classes when it holds none it can show.
key_a, key_b = f"contrast_a_{pick.path}", f"contrast_b_{pick.path}"
if st.session_state.get(key_a) not in decomposed:
    st.session_state[key_a] = default_a if default_a in decomposed else decomposed[0]
class_a = a1.selectbox("A (the model's choice)", decomposed, format_func=lambda i: f"{_name(i)} ({i})", key=key_a)
b_choices = [c for c in decomposed if c != class_a]
if not b_choices:
    st.info("This run has prototypes for one class only: there is nothing to compare with.")
    st.stop()
if st.session_state.get(key_b) not in b_choices:
    st.session_state[key_b] = default_b if default_b in b_choices else b_choices[0]
class_b = a2.selectbox("B (the class it was not)", b_choices, format_func=lambda i: f"{_name(i)} ({i})", key=key_b)

with S.user_errors():
    with model.lock:
        c = contrast_image(model.session, network, found.root / pick.path, int(class_a), int(class_b),
                           class_names=names, notes=entry.notes)
    verdict = "prefers" if c.gap >= 0 else "does not prefer"
    st.subheader(f"The model {verdict} {c.name_a} over {c.name_b}: score difference (logit gap) {c.gap:+.3f}")
    st.markdown(c.story())
    steps = c.steps()
    colors_a = [viz.prototype_color(i) for i in range(len(c.contributions_a))]  # each class its own k (k auto)
    colors_b = [viz.prototype_color(i) for i in range(len(c.contributions_b))]
    st.plotly_chart(viz.figure_waterfall(steps[0][1], [v for _, v in steps[1:]], c.gap, [lab for lab, _ in steps[1:]],
                                         colors_a + colors_b, title=f"{c.name_a}'s score minus {c.name_b}'s, part by part: "
                                                       f"{c.name_a}'s prototypes add, {c.name_b}'s subtract",
                                         start_label="starting values (bias difference)",
                                         end_label="score difference (logit gap)"),
                    key=f"contrast_waterfall_{pick.path}_{class_a}_{class_b}", config={"displayModeBar": False})
    picture = viz.enlarge(c.image, 224)
    left, right = st.columns(2)
    for col, index, name, logit, bias, contrib, maps, labels, colors in (
            (left, c.class_a, c.name_a, c.logit_a, c.bias_a, c.contributions_a, c.maps_a, c.labels_a, colors_a),
            (right, c.class_b, c.name_b, c.logit_b, c.bias_b, c.contributions_b, c.maps_b, c.labels_b, colors_b)):
        with col:
            st.markdown(f"**{name}**: score (logit) {logit:.3f} = starting value (bias) {bias:.3f} + what its "
                        f"prototypes find {float(contrib.sum()):.3f}")
            with S.stop_on_error():  # the class's shard is read here
                top_patches = run.class_meta(index)["top_patches"]
                root = S.image_root_for_run(run, index)
            tiles = st.columns(len(contrib))
            for i in range(len(contrib)):
                with tiles[i]:
                    st.image(viz.prototype_overlay(picture, maps[i], 0.6, colors=[colors[i]]),
                             caption=f"{labels[i]}: {float(contrib[i]):+.3f}")
                    grid = None if root is None else S.patch_grid(
                        str(root), tuple((p["path"], tuple(p["box"])) for p in top_patches[i][:CONTRAST_PATCHES]),
                        colors[i], pre_key, 64, 1)
                    if grid is not None:
                        st.image(grid, caption=f"{labels[i]}: its top training patches")
            if root is None:
                st.caption("The training images of this run are not available here, so the prototypes' top patches "
                           "cannot be shown.")
