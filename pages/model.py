"""Model & data: a built-in demo, an uploaded checkpoint (or a zipped Hugging Face model
folder) or one on the server; the doctor's verdict; an image folder (zip upload or server
path) and what was found in it."""
import pandas as pd
import streamlit as st

from phpn.api import (
    DEMOS,
    describe_class_mapping,
    discovery_defaults,
    get_demo,
    known_archs,
    model_origin,
    read_class_names,
)
from phpn.app import frame as S
from phpn.app import serving
from phpn.app import setup_ui as U
from phpn.app.uploads import MAX_ZIP_BYTES, save_model_upload, save_upload, unpack_uploaded_zip
from phpn.config import class_name, class_names_or_indices
from phpn.errors import ConfigError, DataError

S.frame()
st.title("Model & data")
st.caption("phpn rewrites each class's row of a trained classifier's head as a sum of k part-prototypes. "
           "The predictions do not change; each prototype gets a *where* map and a *what* (its top training "
           "patches). Start with a model and a folder of images, one sub-folder per class.")

# --- the model -------------------------------------------------------------------------------
st.header("1 · Model")
source = st.radio("Where is the model?", ["Built-in demo", "Upload a checkpoint", "Checkpoint on this server"],
                  horizontal=True, key="model_source")


def _parse_floats(text: str, what: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.replace(";", ",").split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{what} must be numbers separated by commas, got '{text}'.",
                          "For example: 0.485, 0.456, 0.406") from None
    if not values:
        raise ConfigError(f"{what} is empty.", "Give one number per input channel, or clear the override.")
    return values


if source == "Built-in demo":
    names = list(DEMOS)
    demo_name = st.selectbox("Demo", names, format_func=lambda n: DEMOS[n].title, key="demo_name")
    st.caption(DEMOS[demo_name].description)
    if st.button("Load this demo", type="primary", key="load_demo"):
        with S.user_errors():
            with st.spinner("Loading the demo's model, images and precomputed run…"):
                warnings = S.load_demo(demo_name)
            st.session_state.pop("boot_warnings", None)
            S.flash(f"Loaded the {demo_name} demo.", place="model")
            for w in warnings:
                S.flash(w, "warning", place="model")
            st.rerun()
else:
    upload = source == "Upload a checkpoint"

    settings = serving.load_settings()
    paths_on = bool(settings.data_roots)
    code_on = settings.allow_code
    if upload:
        # Any name or extension (.pt, .pth, .th, .tar, .ckpt, none…): the content is checked instead.
        ckpt_file = st.file_uploader("Checkpoint: weights saved with torch.save or safetensors (any file name), "
                                     "or a zipped Hugging Face model folder", key="ckpt_upload",
                                     help="A Hugging Face model is the folder that save_pretrained wrote (config.json "
                                          "and model.safetensors, optionally preprocessor_config.json), zipped. "
                                          "Nothing is downloaded and no code from the folder runs.")
    else:
        if not paths_on:
            st.info("Paths on this server are turned off for visitors. " + serving.paths.PATHS_OFF_FIX,
                    icon=":material/lock:")
        ckpt_path = st.text_input("Checkpoint path on this server", key="ckpt_path", disabled=not paths_on,
                                  placeholder="/data/models/resnet50_cub.pth")
    c1, c2 = st.columns(2)
    archs = ["(detect automatically)", "efficientnet-lite0"] + list(known_archs())
    arch = c1.selectbox("Architecture", archs, key="arch",
                        help="torchvision and timm architectures are recognised from the weights' names and shapes.")
    timm_arch = c1.text_input("…or a timm model name", key="timm_arch", placeholder="timm/convnext_tiny",
                              help="Built with timm.create_model(NAME, pretrained=False): for a timm state dict "
                                   "whose weights' names do not tell the model. A Hugging Face model is a folder "
                                   "written by save_pretrained: upload it zipped, or give its path.")
    num_classes = c2.number_input("Number of classes (0: read it from the checkpoint)", min_value=0, value=0,
                                  step=1, key="num_classes")
    with st.expander("Your own architecture (a Python file that builds the model)"):
        if code_on:
            st.caption("The file is **executed on this server** to build the network, in a jailed worker (no network, "
                       f"only your own files, time limit {settings.code_timeout_s:.0f} s to load).")
        else:
            st.info(f"{serving.CODE_OFF_MESSAGE} {serving.ENABLE_HINT}", icon=":material/lock:")
        if upload:
            def_file = st.file_uploader("Model definition (.py)", type=["py"], key="def_upload", disabled=not code_on)
        else:
            def_path = st.text_input("Model definition path (.py)", key="def_path", disabled=not (code_on and paths_on))
        factory = st.text_input("Function or class that builds the model", key="factory", placeholder="make_model",
                                disabled=not code_on)
        run_code = st.checkbox("Run this Python file to build the model", key="run_model_code", disabled=not code_on,
                               help="Required: phpn never executes a file you have not explicitly allowed.")
    trust = st.checkbox("Trust this checkpoint: allow a whole pickled model", key="trust_pickle", disabled=not code_on,
                        help=None if code_on else f"{serving.CODE_OFF_MESSAGE} {serving.ENABLE_HINT}")
    if trust and code_on:
        st.warning("Unpickling a file can run arbitrary code on this server. Tick this only for a file you made "
                   "yourself or got from a source you trust. A state dict file never needs it; a zipped Hugging Face "
                   "folder whose weights are pytorch_model.bin does (transformers unpickles it), while "
                   "model.safetensors never does.", icon=":material/warning:")
    if upload:
        names_file = st.file_uploader("Class names (optional): one per line, or a JSON list (any file name)",
                                      key="names_upload")
    else:
        names_path = st.text_input("Class-names file on this server (optional)", key="names_path",
                                   disabled=not paths_on)
    with st.expander("Preprocessing and layers (defaults come from the model)"):
        p1, p2, p3 = st.columns(3)
        resize = p1.number_input("Resize (shorter side, 0: default)", min_value=0, value=0, key="pre_resize")
        crop = p2.number_input("Centre crop (0: default)", min_value=0, value=0, key="pre_crop")
        channels = p3.selectbox("Input channels", ["default", 3, 1], key="pre_channels")
        mean_text = p1.text_input("Mean (comma separated)", key="pre_mean")
        std_text = p2.text_input("Std (comma separated)", key="pre_std")
        feature_layer = st.text_input("Feature layer (if detection fails)", key="feature_layer")
        head_layer = st.text_input("Head layer (if detection fails)", key="head_layer")

    if st.button("Load model", type="primary", key="load_model"):
        with S.user_errors(), serving.removed_on_error([]) as made:  # a failed load keeps no upload

            if upload:
                if ckpt_file is None:
                    raise DataError("No checkpoint uploaded.", "Choose a checkpoint file first.")
                ws = S.workspace()
                ws.check_room(int(ckpt_file.size), "This checkpoint")
                room = ws.room()
                folder = ws.new_upload_dir()
                made.append(folder)
                with st.spinner("Checking the upload…"):
                    # A zip's unpacked size counts against the quota; pickled weights in it need the opt-ins.
                    saved = save_model_upload(ckpt_file, folder, max_bytes=min(MAX_ZIP_BYTES, room),
                                              trusted=bool(trust))
                checkpoint = saved.path
                origin = model_origin("hf-zip" if saved.kind == "model-folder-zip" else "upload", name=saved.name,
                                      folder=saved.folder)
                model_def_file = None
                if def_file is not None:
                    serving.require_code_allowed("a model file")
                    model_def_file = save_upload(def_file, folder, suffixes=(".py",), what="model file")
                class_names = None
                if names_file is not None:
                    class_names = read_class_names(save_upload(names_file, folder, what="class-names file"))
            else:
                if not ckpt_path.strip():
                    raise DataError("No checkpoint path given.", "Type the path of the checkpoint file on this server.")
                checkpoint = S.visitor_path(ckpt_path, "checkpoint")
                origin = model_origin("server-path", path=checkpoint)
                model_def_file = S.visitor_path(def_path, "model file") if def_path.strip() else None
                class_names = read_class_names(S.visitor_path(names_path, "class-names file")) \
                    if names_path.strip() else None
            if trust:
                serving.require_code_allowed("a trusted (pickled) checkpoint")
            model_def = None
            if model_def_file is not None:
                serving.require_code_allowed("a model file")
                if not run_code:
                    raise ConfigError("A model file was given, but running it was not allowed.",
                                      "Tick 'Run this Python file to build the model' if it is code you trust.")
                if not factory.strip():
                    raise ConfigError("A model file was given without the name of its factory.",
                                      "Type the function or class in the file that builds the model.")
                model_def = f"{model_def_file}:{factory.strip()}"
            named = timm_arch.strip()
            if named and not named.startswith("timm/"):
                named = "timm/" + named
            # A model folder's weights are read as tensors only (its pickles passed the opt-ins above).
            trust_pickle = bool(trust) and origin["how"] != "hf-zip"
            spec = dict(checkpoint=str(checkpoint), arch=named or (None if arch.startswith("(") else arch),
                        model_def=model_def, trust_pickle=trust_pickle, num_classes=int(num_classes) or None,
                        class_names=tuple(class_names) if class_names else None,
                        feature_layer=feature_layer.strip() or None, head_layer=head_layer.strip() or None,
                        origin=origin)
            # Merged into the model's own preprocessing by the library before the doctor runs: one load.
            overrides = {"resize": int(resize) or None, "crop": int(crop) or None,
                         "channels": None if channels == "default" else int(channels),
                         "mean": list(_parse_floats(mean_text, "Mean")) if mean_text.strip() else None,
                         "std": list(_parse_floats(std_text, "Std")) if std_text.strip() else None}
            spec["overrides"] = {k: v for k, v in overrides.items() if v is not None} or None
            with st.spinner("Loading the checkpoint and checking its head…"):
                entry = S.load_model_entry(**spec)
            S.set_model(entry)
            if upload:  # the earlier uploads' model and images are gone from the session: free their room
                S.workspace().forget_uploads(keep=[checkpoint])
            st.session_state.pop("boot_warnings", None)
            S.flash(f"Loaded {entry.label}.", place="model")
            st.rerun()

S.show_flash("model")
model = S.current_model()
if model is not None:
    sess = model.session
    d = sess.diagnosis
    title, kind = S.VERDICT_TEXT[d.verdict]
    text = f"**Doctor's verdict: {title}.** {d.reason}"
    if kind == "success":
        st.success(text, icon=":material/verified:")
    elif kind == "info":
        st.info(text, icon=":material/verified:")
    else:
        st.error(text + " phpn cannot build an exact part-prototype network from it: use a model whose head is "
                 "global average pooling followed by one linear layer (ResNet, DenseNet, EfficientNet, ConvNeXt, …).",
                 icon=":material/block:")
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Architecture", sess.loaded.arch)
    m2.metric("Classes", sess.loaded.num_classes)
    m3.metric("Feature map (D × H × W)", " × ".join(str(v) for v in d.feature_shape) if d.feature_shape else "—")
    pre = sess.preprocess
    m4.metric("Input", f"{pre.channels} × {pre.crop} × {pre.crop}")
    with st.expander("Details"):
        if d.split is not None:
            st.write(f"Features from `{d.split.feature_layer}`, head `{d.split.head_layer}`.")
        st.write(f"Checkpoint sha256 `{sess.loaded.sha256[:16]}…` · source: {S.shown_path(sess.loaded.source)}")
        st.write(f"Preprocessing: resize {pre.resize}, crop {pre.crop}, mean {list(pre.mean)}, std {list(pre.std)}")
        for n in list(sess.loaded.notes) + list(d.notes):
            st.caption(f"• {n}")
        names = sess.class_names
        st.caption("Classes: " + ", ".join(names[:30]) + (" …" if len(names) > 30 else ""))

# --- the images --------------------------------------------------------------------------------
st.header("2 · Images")
if model is None:
    st.info("Load a model first: the class folders are matched to its classes.")
    st.stop()

options = []
if model.session.demo:
    options.append("The demo's images")
options += ["Upload a zip of an image folder", "Image folder on this server"]
data_source = st.radio("Where are the images?", options, horizontal=True, key="data_source")
st.caption("Layout: one sub-folder per class (`root/<class>/<image>`). Folders are matched to the model's "
           "classes by name, by number (`7`, `007`, `007_name`) or, when there are exactly as many folders as "
           "classes, by sorted order.")
demo = get_demo(model.session.demo) if model.session.demo else None
default_cap = int(discovery_defaults(demo.name if demo else None)["images_per_class"] or 0)  # 0: all
c1, c2 = st.columns(2)
cap = c1.number_input("Images per class (0: all)", min_value=0, value=default_cap, step=10, key="data_cap")
seed = c2.number_input("Sampling seed", min_value=0, value=0, step=1, key="data_seed")
zip_file = None
if data_source == "Upload a zip of an image folder":
    zip_file = st.file_uploader("Zip of the image folder", type=["zip"], key="zip_upload")
elif data_source == "Image folder on this server":
    data_paths_on = bool(serving.load_settings().data_roots)
    if not data_paths_on:
        st.info("Paths on this server are turned off for visitors. " + serving.paths.PATHS_OFF_FIX,
                icon=":material/lock:")
    folder_path = st.text_input("Image folder path", key="data_path", placeholder="/data/CUB_200_2011/images",
                                disabled=not data_paths_on)

if st.button("Scan images", type="primary", key="scan"):
    with S.user_errors():
        explain_root = None
        if data_source == "The demo's images":
            root, label, kind = demo.discovery_dir(), f"demo:{demo.name}", "demo"
            try:
                explain_root = demo.explain_dir()
            except Exception:  # noqa: BLE001
                explain_root = None
        elif data_source == "Upload a zip of an image folder":
            if zip_file is None:
                raise DataError("No zip uploaded.", "Choose a .zip of the image folder first.")
            ws = S.workspace()
            room = ws.room()
            ws.check_room(int(zip_file.size), "This zip file")
            with st.spinner("Unpacking…"):
                # The quota bounds what the archive unpacks to; the archive itself is deleted at once.
                root = unpack_uploaded_zip(zip_file, ws.new_upload_dir(), max_bytes=min(MAX_ZIP_BYTES, room))
            label, kind = f"upload:{zip_file.name}", "upload"
        else:
            if not folder_path.strip():
                raise DataError("No folder given.", "Type the path of the image folder on this server.")
            root = S.visitor_path(folder_path, "image folder")
            label, kind = str(root), "path"
        with st.spinner("Scanning the class folders…"):
            data = S.scan_data(model, root, int(cap) or None, int(seed))
        S.set_data(S.DataEntry(data=data, label=label, kind=kind, cap=int(cap) or None, seed=int(seed),
                               explain_root=explain_root))
        S.flash(f"Found {len(data.classes)} classes.", place="data")
        st.rerun()

S.show_flash("data")

data = S.current_data()
if data is not None:
    summary = data.data.summary()
    # A model without names: the folders' (as a run records them).
    names = class_names_or_indices(model.session.loaded.class_names or data.data.class_names,
                                   model.session.loaded.num_classes)
    n1, n2, n3 = st.columns(3)
    n1.metric("Classes found", summary["classes"])
    n2.metric("Images", summary["images"])
    n3.metric("Skipped files", len(summary["skipped"]))
    rows = [{"folder": c.folder, "class index": c.class_index,
             "class name": class_name(names, c.class_index), "images": len(c.paths)}
            for c in data.data.classes]
    st.dataframe(pd.DataFrame(rows), hide_index=True, height=min(400, 38 + 35 * len(rows)))

    st.caption(describe_class_mapping(data.data.class_mapping))
    if summary["skipped"]:
        with st.expander(f"Skipped files ({len(summary['skipped'])})"):
            st.dataframe(pd.DataFrame(summary["skipped"], columns=["file", "why"]), hide_index=True)
    st.caption(f"Folder: `{S.shown_path(data.data.root)}`")

    # --- the setup check: before any heavy work --------------------------------------------------
    st.header("3 · Setup check")
    setup = U.setup_check_for(model, data)
    U.show_setup_check(setup)
    if setup is not None:
        running = st.session_state.get("job") is not None and st.session_state["job"].running
        U.check_preprocessing_section(model, data, running, expanded=not setup.ok)
