"""Explain an image: top-5 predictions; for the chosen class each prototype's map over the
image, the raw feature-grid map beside the upsampled one, bias → logit through the
prototypes, "this looks like that", and the class map as the sum of the prototype maps."""
import hashlib
import html
import random
from pathlib import Path

import numpy as np
import streamlit as st

from phpn.app import frame as S
from phpn.config import MAP_OPACITY, class_name
from phpn.glossary import explain, fidelity_warning
from phpn.runs.annotations import label_heading, prototype_labels
from phpn.show import viz

S.frame()
st.title("Explain an image")
entry = S.require_run()
model = S.current_model()
run, network = entry.run, entry.network
data = S.current_data()
names = model.session.class_names
pre_key = S.preprocess_key(model.session.preprocess)

from phpn.api import explain_image
from phpn.method.certify import chance_warning  # noqa: E402
from phpn.pipeline.mistakes import folder_labels

_chance = chance_warning(run.meta.get("certificate"))
if _chance:  # before any explanation: the model cannot read these inputs
    st.error(_chance, icon=":material/warning:")


@st.cache_data(max_entries=32, show_spinner=False)
def _folder_labels(root: str, model_key: str, _model) -> dict:
    return folder_labels(root, _model.session)


def _name(i: int) -> str:
    return class_name(names, i)


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
            from phpn.app.uploads import open_uploaded_image

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
        from phpn.images.data import load_image

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
with c_pred:
    st.plotly_chart(viz.figure_top_predictions(best.top, title="Top-5 predictions"), key=f"top_{image_key}",
                    config={"displayModeBar": False})

with S.stop_on_error():  # another class: its shard is read now
    e = best if cls == best.class_index else _explain(entry.id, image_key, int(cls), model, network, image)
st.session_state["explained"] = {"explanation": e, "label": image_label, "run_id": entry.id, "true_class": true_class,
                                 "opacity": float(opacity)}
k = len(e.contributions)
colors = [viz.prototype_color(i) for i in range(k)]
labels = prototype_labels(entry.notes, e.class_index, k)
S.set_url(image=image_label if source != "Upload an image" else None)
size = 224
picture = viz.enlarge(e.image, size)

st.subheader(f"Why “{e.class_name}”? logit {e.logit:.3f} = bias {e.bias:.3f} + Σ prototypes "
             f"{float(np.sum(e.contributions)):.3f}")
v1, v2, v3, v4 = st.columns(4)
v1.image(picture, caption="What the model sees")
v2.image(viz.prototype_overlay(picture, e.maps, opacity, colors=colors, mode=smooth),
         caption="All prototypes, each on its own scale (stripes: two overlap; hatching: the class map subtracts)")
v3.image(viz.heat_overlay(picture, e.class_map, opacity, mode=smooth),
         caption="Class map = Σ prototype maps (yellow-red adds, grey hatching subtracts)")
v4.image(viz.grid_image(e.class_map, size), caption=f"Class map on the raw {e.maps.shape[1]}×{e.maps.shape[2]} grid")
st.markdown(" ".join(f"{viz.color_swatch(colors[i])}{html.escape(labels[i])}" for i in range(k)), unsafe_allow_html=True)

st.plotly_chart(viz.figure_waterfall(e.bias, e.contributions, e.logit, labels, colors,
                                     title="From the bias to the logit, prototype by prototype"),
                key=f"waterfall_{image_key}_{cls}", config={"displayModeBar": False})
with st.popover("What do these words mean?", icon=":material/help:"):
    for term in ("logit", "bias", "prototype", "contribution", "map", "fidelity", "agreement"):
        st.markdown(f"**{term.capitalize()}**: {explain(term)}")

st.subheader("This looks like that")
meta = run.class_meta(e.class_index)
train_root = S.image_root_for_run(run, e.class_index)
for i in range(k):
    with st.container(border=True):
        flags = "".join(f" `{f}`" for f in entry.notes.get(e.class_index, i).flags) if entry.notes else ""
        st.markdown(f"{viz.color_swatch(colors[i], 16)} **{label_heading(labels[i])}**{flags}: contributes "
                    f"{float(e.contributions[i]):+.3f} here (class mean {meta['mean_contribution'][i]:+.3f}; "
                    f"map fidelity {meta['fidelity'][i]:.2f})", unsafe_allow_html=True, help=explain("fidelity"))
        if fidelity_warning(meta["fidelity"][i]):
            st.warning(fidelity_warning(meta["fidelity"][i]), icon=":material/warning:")
        a, b, c = st.columns([1, 1, 2])
        a.image(viz.prototype_overlay(picture, e.maps[i], opacity, colors=[colors[i]], mode=smooth),
                caption="Where, upsampled: " + viz.scale_caption(viz.own_scale(e.maps[i])))
        b.image(viz.grid_image(e.maps[i], 180, color=colors[i]), caption="Raw feature grid, the same scale (its "
                                                                          "colour adds, grey subtracts)")
        with c:
            if train_root is not None:
                grid = S.patch_grid(str(train_root), tuple((p["path"], tuple(p["box"])) for p in meta["top_patches"][i]),
                              colors[i], pre_key, 96, 3)
                if grid is not None:
                    st.image(grid, caption="Looks like: its top training patches")
            else:
                st.caption("The training images of this run are not available here.")
