"""Discover: settings, a live run with progress per stage and a cancel button, the
certificate, timings, the per-class refinement table; save and load runs."""
import itertools
import time

import pandas as pd
import streamlit as st
import torch

from phpn import config as D
from phpn.api import (
    Certificate,
    DiscoveryConfig,
    chance_warning,
    discovery_defaults,
    resolve_discovery,
    run_seal_sha256,
    run_tensors_sha256,
    save_run,
)
from phpn.app import frame as S
from phpn.app import setup_ui as U
from phpn.errors import DataError
from phpn.glossary import explain as term

EXPERT_TABLE_CLASSES = 500  # rows of the per-class table; the Class browser shows any class

S.frame()
st.title("Discover part-prototypes")
model = S.require_model()
data = S.current_data()
job = st.session_state.get("job")
running = job is not None and job.running

# --- settings ------------------------------------------------------------------------------
defaults = discovery_defaults(model.session.demo)  # the table the CLI and the API use too

if data is None:
    st.info("No images are loaded: scan an image folder on the **Model & data** page to run a discovery. "
            "You can still load a saved run below.")
else:
    setup = U.setup_check_for(model, data)  # made on Model & data already, or now: one pass over a sample
    if setup is not None and not setup.ok:
        U.show_setup_check(setup)
    S.remember("disc_k", "disc_cap", "disc_solver", "disc_device", "disc_objective", "disc_scaling", "disc_seed",
               "disc_top")
    with st.form("discover_form", border=True):
        c1, c2, c3, c4 = st.columns(4)
        k = c1.slider("Prototypes per class (k)", D.K_MIN, D.K_MAX, int(defaults["k"]), key="disc_k")
        # Every scanned image unless capped: the largest class's count means "all".
        cap_all = max(len(c.paths) for c in data.data.classes) if data.data.classes else 1
        cap_default = int(data.cap or defaults["images_per_class"] or cap_all)
        cap = c2.number_input("Images per class", min_value=1, value=cap_default, step=10, key="disc_cap")
        solver = c3.selectbox("Refinement solver", D.SOLVERS, index=D.SOLVERS.index(defaults["solver"]),
                              key="disc_solver",
                              help="lbfgs: gradient-based (default, fast). nelder-mead: the paper's solver (barely "
                                   "moves in high dimensions). none: equal split of the residual.")
        devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
        device = c4.selectbox("Device", devices, key="disc_device")
        with st.expander("More settings"):
            a1, a2, a3, a4 = st.columns(4)
            objective = a1.selectbox("Objective", D.OBJECTIVES, index=D.OBJECTIVES.index(defaults["objective"]),
                                     key="disc_objective",
                                     help="prototype: keep each final prototype's map like its NMF part (default). "
                                          "residual: the paper's objective on the residual shares.")
            scaling = a2.selectbox("Scaling", D.SCALINGS, index=D.SCALINGS.index(defaults["scaling"]),
                                   key="disc_scaling",
                                   help="lstsq: least squares (α may be negative). nnls: non-negative α.")
            seed = a3.number_input("Seed", min_value=0, value=int(defaults["seed"]), key="disc_seed")
            top_patches = a4.number_input("Top patches per prototype", 1, 24, int(defaults["top_patches"]),
                                          key="disc_top")
            auto_k = st.toggle(f"Choose each class's k (2 to {D.AUTO_K_MAX}) where NMF's error curve bends most",
                               value=False, key="disc_auto_k",
                               help="Instead of the same k for every class: each class gets the k after which "
                                    "more prototypes explain little more of its features. The slider above is "
                                    "then not used; each class's page says why its k was chosen.")
            # The folders name the classes of a model without names (as the run will record them).
            names = D.class_names_or_indices(model.session.loaded.class_names or data.data.class_names,
                                             model.session.loaded.num_classes)
            subset = st.multiselect("Only these classes (empty: every class with images)",
                                    [c.class_index for c in data.data.classes],
                                    format_func=lambda i: f"{D.class_name(names, i)} ({i})",
                                    key="disc_classes")
            budget = st.number_input("Memory budget (MB)", min_value=0, value=DiscoveryConfig.memory_budget_mb,
                                     step=256, key="disc_budget",
                                     help="Features held at once: classes are decomposed in groups that fit. "
                                          "Lower it if discovery runs out of memory (0: one class at a time).")
        confirmed = True
        if setup is not None and setup.near_chance:
            confirmed = st.checkbox("Discover anyway at this setting (the model is near chance on these images)",
                                    key="disc_confirm_chance",
                                    help="Its prototypes would describe a model that cannot read the images; "
                                         "Check preprocessing below looks for the setting it can read them at.")
        start = st.form_submit_button("Start discovery", type="primary", disabled=running)
    S.memorise("disc_k", "disc_cap", "disc_solver", "disc_device", "disc_objective", "disc_scaling", "disc_seed",
               "disc_top")

    if start and not running and not confirmed:
        st.error("Not started: the model is near chance on these images at this setting. Tick “Discover anyway” "
                 "to run it all the same, or find the right setting with Check preprocessing first.",
                 icon=":material/block:")
    elif start and not running:
        with S.user_errors():
            config = resolve_discovery(
                model.session.demo, k="auto" if auto_k else int(k), images_per_class=int(cap), solver=solver,
                objective=objective, scaling=scaling, seed=int(seed), device=device, top_patches=int(top_patches),
                classes=tuple(int(c) for c in subset) if subset else None, memory_budget_mb=int(budget))
            run_data = data.data
            if (data.cap or cap_all) != int(cap) or data.seed != int(seed):
                run_data = S.scan_data(model, data.data.root, int(cap), int(seed))
            if not run_data.classes:
                raise DataError("The image folder has no classes.", "Scan another folder on the Model & data page.")
            job = S.DiscoveryJob(model, run_data, config, data.label).start()
            st.session_state["job"] = job
            st.session_state.pop("job_note", None)
            running = True


# --- check preprocessing ---------------------------------------------------------------------
if data is not None:
    current = S.current_run()
    at_chance = bool(current and chance_warning(current.run.recorded_certificate))
    U.check_preprocessing_section(model, data, running,
                                  expanded=at_chance or bool(setup and setup.near_chance))


# --- live progress -----------------------------------------------------------------------------
def _progress_body(job) -> None:
    now = time.time()
    for stage in S.STAGES:
        p = job.stages[stage]
        label = S.STAGE_LABELS[stage]
        if p.total:
            left = p.remaining(now)
            extra = "done" if p.fraction >= 1 else f"{p.done}/{p.total}, {S.format_seconds(left)} left"
            st.progress(p.fraction, text=f"{label}: {extra}")
        else:
            st.progress(0.0, text=f"{label}: waiting")
    st.caption(f"Elapsed {S.format_seconds(job.elapsed())} · about {S.format_seconds(job.remaining())} remaining "
               "(cancelling takes effect at the next progress step)")


@st.fragment(run_every=0.5)
def live_progress():
    job = st.session_state.get("job")
    if job is None:
        return
    if not job.running:
        st.rerun()  # the whole page: show the result
    with st.container(border=True):
        if job.waiting:
            st.info(job.queue_text(), icon=":material/hourglass_top:")
        else:
            st.markdown("**Discovery running…**")
        _progress_body(job)
        if st.button("Cancel", key="cancel_job", disabled=job.cancel_event.is_set()):
            job.cancel()
            st.toast("Cancelling…")


if running:
    live_progress()
elif job is not None:
    if job.status == "cancelled":
        st.warning(f"The discovery was cancelled after {S.format_seconds(job.elapsed())}. The previous run (if any) "
                   "is kept and nothing saved was touched.", icon=":material/stop_circle:")
    elif job.status == "failed":
        st.error(job.error or "The discovery failed.", icon=":material/error:")
    elif job.status == "done":
        st.success(f"Discovery finished in {S.format_seconds(job.elapsed())}.", icon=":material/verified:")
    if st.session_state.get("job_note"):
        st.warning(st.session_state["job_note"])

# --- the current run ----------------------------------------------------------------------------
entry = S.current_run()
if entry is not None:
    run = entry.run
    st.header("Current run")
    st.caption(f"{run.created or ''} · {entry.origin} · {len(run.class_records)} classes × k = {run.k_label} · "
               f"solver {run.settings['solver']}, objective {run.settings['objective']}, "
               f"scaling {run.settings['scaling']}, device {run.device or '?'}")
    cert = run.recorded_certificate
    if cert:

        warning = chance_warning(cert)
        if warning:  # before anything else about this run: its explanations would mislead
            st.error(warning, icon=":material/warning:")
        c = Certificate.from_dict(cert)
        passed = cert["passed"]
        headline = (f"**Certificate {'PASSED' if passed else 'FAILED'}**: the part-prototype network "
                    f"{'reproduces' if passed else 'does not reproduce'} the original model on {cert['images']} images.")
        (st.success if passed else st.error)(headline, icon=":material/verified:" if passed else ":material/cancel:")
        c1, c2, c3, c4, c5 = st.columns(5)
        c1.metric("Agreement (images)", f"{c.agreed} / {c.images}", help=term("agreement"))
        c2.metric("Model accuracy", f"{100 * c.accuracy:.1f}%" if c.accuracy is not None else "unknown",
                  help=term("accuracy") + (f" Here: {c.correct} right of {c.labelled_images} labelled images."
                                           if c.labelled_images else " These images had no labels."))
        c3.metric("Max |Δ logit|", f"{cert['max_logit_diff']:.2g}",
                  help=f"{cert['relative_logit_diff']:.2g} of the largest |logit| ({cert['max_abs_logit']:.3g})")
        c4.metric("Max head error ‖Σp̃ − v‖/‖v‖", f"{cert['max_head_error']:.2g}")
        c5.metric("Certificate time", f"{c.seconds:.2g} s" if c.seconds is not None else "not recorded",
                  help="Wall-clock time of the certificate itself; from discovery's own forward pass it costs "
                       "little beyond the features.")
    else:
        st.info("This run has no certificate.")
    t = run.timings
    if t:
        t1, t2, t3, t4 = st.columns(4)
        t1.metric("Features", f"{t.get('features_s', 0):.1f} s")
        t2.metric("NMF", f"{t.get('nmf_s', 0):.1f} s")
        t3.metric("Refinement", f"{t.get('refine_s', 0):.1f} s")
        t4.metric("Discovery total", f"{t.get('total_s', 0):.1f} s", help="Without the certificate.")
    if entry.wall:
        st.caption(f"Live run as timed by the app: certificate {entry.wall.get('certify', 0):.1f} s, "
                   f"everything {entry.wall.get('total', 0):.1f} s from the click to the certificate.")
    names = run.class_names
    rows = []
    with S.user_errors():  # a saved run's shards are first read here: a damaged one is said, the page goes on
        # A large saved run reads its records shard by shard: the table shows the first classes only.
        for c in itertools.islice(run.class_records, EXPERT_TABLE_CLASSES):
            before, after = c["objective_before"], c["objective_after"]
            rows.append({
                "class": f"{D.class_name(names, c['index'])} ({c['index']})",
                "images": c["images"],
                "α": ", ".join(f"{a:.3g}" for a in c["alpha"]),
                "negative α": c["negative_alpha"],
                "residual ‖R‖/‖v‖": c["residual_ratio"],
                "objective before": before,
                "objective after": after,
                "improvement": (1 - after / before) if before else 0.0,
                "fidelity": ", ".join(f"{f:.2f}" for f in c["fidelity"]),
                "min fidelity": min(c["fidelity"]),
                "NMF rel. error": c["nmf_relative_error"],
                # Not converged: stopped at the iteration cap, so the split may move with rounding.
                "refinement iterations": c.get("refine_iterations"),
                "converged": c.get("refine_converged"),
            })
    with st.expander("Expert details: the refinement, class by class (α, residual, objective, fidelity)"):
        st.caption("Map fidelity: correlation of each final prototype's map with its NMF part's map over the "
                   "discovery images (1 = the picture of the part is exactly what the prototype uses).")
        if len(run.class_records) > len(rows):
            st.caption(f"The first {len(rows)} of the run's {len(run.class_records)} classes; the Class browser "
                       "shows any class.")
        st.dataframe(pd.DataFrame(rows), hide_index=True,
                     column_config={"improvement": st.column_config.NumberColumn(format="percent"),
                                    "residual ‖R‖/‖v‖": st.column_config.NumberColumn(format="%.3f"),
                                    "objective before": st.column_config.NumberColumn(format="%.4g"),
                                    "objective after": st.column_config.NumberColumn(format="%.4g"),
                                    "min fidelity": st.column_config.NumberColumn(format="%.3f"),
                                    "NMF rel. error": st.column_config.NumberColumn(format="%.3f")})
    skipped = run.data_info.get("skipped", [])
    if skipped:
        with st.expander(f"Files skipped during discovery ({len(skipped)})"):
            st.dataframe(pd.DataFrame(skipped, columns=["file", "why"]), hide_index=True)

    st.subheader("Save this run")
    if entry.saved_to:
        kept = entry.origin == "live discovery" and S.workspace().owns(entry.saved_to)
        st.caption(f"Saved at `{S.shown_path(entry.saved_to)}`"
                   + (" (kept the moment it was made, so a reload does not lose it); save it again under a name "
                      "of your own if you like." if kept else "."))
    save_path = st.text_input("Name (saved in your private workspace; a folder under PHPN_DATA_ROOTS if the "
                              "operator allows one)", value=S.default_run_name(model, run), key="save_path")
    if st.button("Save run", key="save_run"):
        with S.user_errors():
            target = S.save_target(save_path)
            before = (run_tensors_sha256(run), run_seal_sha256(run))
            save_run(run, target)  # refuses anything there already: a file, a folder, another run
            if entry.notes is not None:  # the same prototypes: their notes follow the copy
                entry.notes.follow_copy(before, run)
            if S.workspace().owns(target):
                S.workspace().keep_within_quota(target)  # over the visitor's quota: removed again
            entry.saved_to = target
            S.flash(f"Saved to `{S.shown_path(target)}` (written atomically: a complete run or nothing).",
                    place="save")
            st.rerun()
    S.show_flash("save")

# --- load a run ----------------------------------------------------------------------------------
st.header("Load a saved run")


known = S.known_runs()  # this visitor's runs, the shared ones, the demos'
choice = st.selectbox("Runs found", ["(type a path below)"] + [label for label, _ in known], key="load_choice")
typed = st.text_input("Run folder path (under PHPN_DATA_ROOTS, if the operator allows paths)", key="load_path")
if st.button("Load run", key="load_run", disabled=running):
    with S.user_errors():
        path = typed.strip() or (choice if not choice.startswith("(") else "")
        if not path:
            raise DataError("No run folder given.", "Pick one of the runs found or type the folder's path.")
        folder = S.run_folder(path)
        # The run's own model is opened with it (asked for only when it is not here).
        missing = S.reopen_run(folder, f"loaded from {S.shown_path(folder)}")
        if missing:
            S.flash(missing, kind="warning", place="load")
        else:
            S.flash(f"Loaded the run at `{S.shown_path(folder)}` with its model.", place="load")
        st.rerun()

st.markdown("**Or upload a run's zip** (what the Export page gives): it is checked, kept in your workspace under a "
            "new name, and opened with its model.")
run_zip = st.file_uploader("A run's zip", type=["zip"], key="load_zip")
if st.button("Open the uploaded run", key="load_zip_run", disabled=running or run_zip is None):
    with S.user_errors():
        folder, missing = S.open_run_zip(run_zip)
        if missing:
            S.flash(f"Kept the run as `{S.shown_path(folder)}`. {missing}", kind="warning", place="load")
        else:
            S.flash(f"Opened the uploaded run with its model; it is kept as `{S.shown_path(folder)}`.", place="load")
        st.rerun()
S.show_flash("load")
