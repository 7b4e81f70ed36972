"""Class browser: a class's prototypes: their share of the logit, what they look like (top
training patches), where they fire on a few class images, and which other classes have
similar prototypes ("shared parts")."""

import numpy as np
import streamlit as st

from pages import _shared as S
from phpn import viz

S.frame()
st.title("Class browser")
entry = S.require_run()
model = S.current_model()
run, network = entry.run, entry.network
names = run.class_names
classes = run.class_indices.tolist()
pre = model.session.preprocess
pre_key = S.preprocess_key(pre)
root = S.image_root_for_run(run)


def _name(i: int) -> str:
    return names[i] if i < len(names) else str(i)


@st.cache_data(max_entries=64, show_spinner=False)
def _similar(run_id: str, class_index: int, top: int, _run) -> list:
    return viz.prototype_similarity(_run.prototypes, _run.class_indices, class_index, top=top)


@st.cache_data(max_entries=64, show_spinner=False)
def _maps(run_id: str, class_index: int, paths: tuple, root: str, _entry, _network):
    with _entry.lock:
        pictures, maps, contrib, kept = viz.class_maps(_network, _entry.session.preprocess, root, paths, class_index)
    return [np.asarray(p) for p in pictures], maps, contrib, kept


@st.cache_data(max_entries=256, show_spinner=False)
def _overlay_row(run_id: str, class_index: int, proto: int, paths: tuple, opacity: float, _pictures, _maps, vmax: float):
    color = viz.prototype_color(proto)
    tiles = [viz.prototype_overlay(viz.enlarge(p, 112), m[proto], opacity, colors=[color], vmax=vmax)
             for p, m in zip(_pictures, _maps)]
    return np.asarray(viz.image_grid(tiles, columns=len(tiles)))


S.remember("browser_class", "browser_n_maps", "browser_opacity", options={"browser_class": classes})
c_sel, c_opts = st.columns([3, 2])
class_index = c_sel.selectbox("Class (type to search)", classes, format_func=lambda i: f"{_name(i)} ({i})",
                              key="browser_class")
n_maps = c_opts.slider("Class images for the maps", 1, 8, 4, key="browser_n_maps")
opacity = c_opts.slider("Map opacity", 0.0, 1.0, 0.6, 0.05, key="browser_opacity")
S.memorise("browser_class", "browser_n_maps", "browser_opacity")
meta = run.class_meta(class_index)
k = run.k
colors = [viz.prototype_color(i) for i in range(k)]
labels = [f"prototype {i + 1}" for i in range(k)]
shares = viz.contribution_shares(meta["mean_contribution"])

left, right = st.columns([3, 2])
with left:
    st.plotly_chart(viz.figure_contributions(meta["mean_contribution"], labels, colors,
                                             title=f"{_name(class_index)}: mean contribution of each prototype"),
                    key=f"contrib_{class_index}", config={"displayModeBar": False})
with right:
    st.markdown(f"**{_name(class_index)}** (class {class_index}) · {meta['images']} discovery images")
    a, b = st.columns(2)
    a.metric("Residual ‖R‖/‖v‖", f"{meta['residual_ratio']:.3f}", help="How much of the head row the scaled NMF "
             "parts did not explain, before the residual was split among them.")
    b.metric("Negative α", meta["negative_alpha"])
    a.metric("Objective before", f"{meta['objective_before']:.4g}")
    b.metric("Objective after", f"{meta['objective_after']:.4g}")
    st.caption("Each prototype's contribution to an image's logit is the mean of its map; the bars are the "
               "means over the class's discovery images, and the shares are of (logit − bias).")

if root is None:
    st.warning("The training images of this run are not available here, so the patches and maps cannot be shown. "
               "Scan the image folder the run was made from on the Model & data page.")
paths = tuple(meta.get("paths", [])[:n_maps])
pictures, maps, vmax = [], None, 1.0
if root is not None and paths:
    pictures, maps, contrib, kept = _maps(entry.id, class_index, paths, str(root), model, network)
    if len(pictures):
        vmax = viz.signed_scale(maps)
similar = _similar(entry.id, class_index, 3, run)

for i in range(k):
    with st.container(border=True):
        fid = meta["fidelity"][i]
        st.markdown(f"{viz.color_swatch(colors[i], 16)} **Prototype {i + 1}** &nbsp;·&nbsp; mean contribution "
                    f"**{meta['mean_contribution'][i]:+.3f}** ({100 * shares[i]:.0f}% of the logit) &nbsp;·&nbsp; "
                    f"map fidelity **{fid:.3f}** &nbsp;·&nbsp; α {meta['alpha'][i]:.3g}", unsafe_allow_html=True,
                    help="Map fidelity: correlation between this prototype's map and its NMF part's map over the "
                         "discovery images. α: the least-squares scale of its NMF part.")
        if fid < 0.5:
            st.caption(":material/warning: Low fidelity: the patches below may not be what this prototype "
                       "responds to.")
        what, where = st.columns([1, 1])
        with what:
            st.markdown("*What* — its top training patches (boxed)")
            if root is not None:
                grid = S.patch_grid(str(root), tuple((p["path"], tuple(p["box"])) for p in meta["top_patches"][i]),
                                   colors[i], pre_key, 96, 3)
                if grid is not None:
                    st.image(grid)
        with where:
            st.markdown("*Where* — on class images (colour adds, grey subtracts)")
            if len(pictures):
                st.image(_overlay_row(entry.id, class_index, i, paths, float(opacity), pictures, maps, float(vmax)))
        if similar[i]:
            items = " · ".join(f"{_name(s['class_index'])} prototype {s['prototype'] + 1} (cos {s['cosine']:.2f})"
                               for s in similar[i])
            st.caption(f"Shared parts — similar prototypes of other classes: {items}")
        else:
            st.caption("Shared parts: no prototype of another class points the same way (cosine > 0).")
