"""Explain an image: top-5 predictions; for the chosen class each prototype's map over the
image, the raw feature-grid map beside the upsampled one, bias → logit through the
prototypes, "this looks like that", and the class map as the sum of the prototype maps.
Everything shown comes from one view (phpn.show.compose), the one the exported report and
picture draw."""
import hashlib
import html
import json
import random
from pathlib import Path

import streamlit as st
from PIL import Image

from phpn.api import chance_warning, explain_image, folder_labels, load_image
from phpn.app import frame as S
from phpn.app.uploads import open_uploaded_image
from phpn.config import MAP_OPACITY, class_name
from phpn.glossary import explain
from phpn.show import viz
from phpn.show.compose import compose_explanation

S.frame()
st.title("Explain an image")
entry = S.require_run()
model = S.current_model()
run, network = entry.run, entry.network
data = S.current_data()
names = model.session.class_names


_chance = chance_warning(run.recorded_certificate)
if _chance:  # before any explanation: the model cannot read these inputs
    st.error(_chance, icon=":material/warning:")


@st.cache_data(max_entries=32, show_spinner=False)
def _folder_labels(root: str, model_key: str, _model) -> dict:
    return folder_labels(root, _model.session)


def _name(i: int) -> str:
    return class_name(names, i)


@st.cache_data(max_entries=32, show_spinner=False)
def _view(run_id: str, image_key: str, class_index: int, opacity: float, mode: str, notes_key: str, root, image_label,
          true_class, _e, _run, _notes):
    """What is shown (the same view the exported report and picture draw), the top patches read
    through the app's cache of discovery images."""
    pre_key = S.preprocess_key(_e.preprocess)

    def seen(path):
        picture = S.seen_image(str(Path(root) / path), pre_key)
        return None if picture is None else Image.fromarray(picture)

    return compose_explanation(_e, _run, notes=_notes, image_root=root, opacity=opacity, mode=mode,
                               image_name=image_label, true_class=true_class, seen=seen if root else None)


@st.cache_data(max_entries=256, show_spinner=False)
def _explain(run_id: str, image_key: str, class_index, _model, _network, _image):
    with _model.lock:
        return explain_image(_model.session, _network, _image, class_index=class_index)


# --- which image -------------------------------------------------------------------------------
folders = {}
if data is not None and data.explain_root is not None:
    folders["Held-out explain set"] = Path(data.explain_root)
if data is not None:
    folders["Discovery images"] = Path(data.data.root)
options = list(folders) + ["Upload an image"]
S.remember("explain_source", "explain_opacity", "explain_mode", options={"explain_source": options})
source = st.radio("Image", options, horizontal=True, key="explain_source")

image, image_key, image_label, true_class = None, None, None, None
if source == "Upload an image":
    up = st.file_uploader("An image (PNG, JPEG, BMP, GIF, TIFF, WebP)",
                          type=["png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp"], key="explain_upload")
    if up is not None:
        with S.user_errors():
            raw = bytes(up.getbuffer())
            image = open_uploaded_image(up)
            image_key = "upload:" + hashlib.sha256(raw).hexdigest()
            image_label = up.name
else:
    root = folders[source]
    class_dirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        st.error(f"{S.shown_path(root)} has no class folders.")
        st.stop()
    c1, c2, c3 = st.columns([2, 3, 1])
    S.remember("explain_folder", options={"explain_folder": class_dirs})
    folder = c1.selectbox("Class folder", class_dirs, key="explain_folder")
    files = sorted(p.name for p in (root / folder).iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        st.error(f"The folder {folder} has no files.")
        st.stop()
    if c3.button("Random", icon=":material/casino:", key="explain_random"):
        st.session_state["explain_file"] = random.choice(files)
    S.remember("explain_file", options={"explain_file": files})
    if st.session_state.get("explain_file") not in files:
        st.session_state["explain_file"] = files[0]
    name = c2.selectbox("Image", files, key="explain_file")
    S.memorise("explain_folder", "explain_file")
    path = root / folder / name
    with S.user_errors():
        image = load_image(path)
        image_key = f"file:{path}:{path.stat().st_mtime_ns}"
        image_label = f"{folder}/{name}"
        true_class = _folder_labels(str(root), model.key, model).get(folder)

if image is None:
    st.info("Pick or upload an image.")
    st.stop()

# --- predictions and class ----------------------------------------------------------------------
try:
    best = _explain(entry.id, image_key, None, model, network, image)
except Exception as exc:  # noqa: BLE001
    S.show_error(exc)
    st.stop()
decomposed = set(run.class_indices.tolist())
choices = [c for c, *_ in best.top if c in decomposed] + sorted(decomposed - {c for c, *_ in best.top})
top1 = best.top[0][0]
c_pred, c_class = st.columns([3, 2])
with c_class:
    cls = st.selectbox("Explain the class", choices, format_func=lambda i: f"{_name(i)} ({i})",
                       key=f"explain_class_{image_key}")
    opacity = st.slider("Map opacity", 0.0, 1.0, MAP_OPACITY, 0.05, key="explain_opacity")
    smooth = st.radio("Upsampling", ["bicubic", "nearest"], horizontal=True, key="explain_mode",
                      help="How the feature-grid map is stretched over the image; the raw grid is always shown too.")
    S.memorise("explain_source", "explain_opacity", "explain_mode")
    if top1 not in decomposed:
        st.info(f"The top prediction {_name(top1)} has no prototypes in this run.")
if true_class is not None and true_class != top1:
    st.warning(f"**Mistake**: the model predicts **{_name(top1)}**, but this image is labelled **{_name(true_class)}** "
             f"(its folder). The **Mistakes first** page shows why {_name(top1)} and not {_name(true_class)}.",
             icon=":material/close:")
elif true_class is not None:
    st.success(f"The model is right: the image is labelled **{_name(true_class)}** (its folder).",
               icon=":material/check:")
with S.stop_on_error():  # another class: its shard is read now
    e = best if cls == best.class_index else _explain(entry.id, image_key, int(cls), model, network, image)
st.session_state["explained"] = {"explanation": e, "label": image_label, "run_id": entry.id, "true_class": true_class,
                                 "opacity": float(opacity), "mode": smooth}
S.set_url(image=image_label if source != "Upload an image" else None)
train_root = S.image_root_for_run(run, e.class_index)
notes_key = json.dumps([entry.notes.get(e.class_index, i).to_dict() for i in range(len(e.contributions))]
                       if entry.notes is not None else None)  # this class's notes only: a rename redraws it
view = _view(entry.id, image_key, int(e.class_index), float(opacity), smooth, notes_key,
             str(train_root) if train_root is not None else None, image_label, true_class, e, run, entry.notes)

with c_pred:
    st.plotly_chart(viz.figure_top_predictions(view.top, title="Top-5 predictions"), key=f"top_{image_key}",
                    config={"displayModeBar": False})

st.subheader(view.heading)
for column, panel in zip(st.columns(len(view.overview)), view.overview):
    column.image(panel.picture, caption=panel.caption)
st.markdown(" ".join(f"{viz.color_swatch(color)}{html.escape(label)}" for label, color in view.legend),
            unsafe_allow_html=True)

w = view.waterfall
st.plotly_chart(viz.figure_waterfall(w.values[0], w.values[1:], w.logit, w.labels[1:], w.colors[1:], title=w.title),
                key=f"waterfall_{image_key}_{cls}", config={"displayModeBar": False})
with st.popover("What do these words mean?", icon=":material/help:"):
    for term in ("logit", "bias", "prototype", "contribution", "map", "fidelity", "agreement"):
        st.markdown(f"**{term.capitalize()}**: {explain(term)}")

st.subheader("This looks like that")
if view.patches_note:
    st.caption(view.patches_note)
for p in view.prototypes:
    with st.container(border=True):
        flags = "".join(f" `{f}`" for f in p.flags)
        st.markdown(f"{viz.color_swatch(p.color, 16)} **{html.escape(p.title)}**{flags}: {p.summary}",
                    unsafe_allow_html=True, help=explain("fidelity"))
        if p.warning:
            st.warning(p.warning, icon=":material/warning:")
        if p.description:
            st.caption(p.description)
        a, b, c = st.columns([1, 1, 2])
        a.image(p.where.picture, caption=p.where.caption)
        b.image(p.grid.picture, caption=p.grid.caption)
        if p.looks_like is not None:
            c.image(p.looks_like.picture, caption=p.looks_like.caption)
