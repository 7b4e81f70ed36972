"""Command line: ``python -m phpn {discover,certify,explain,doctor,evaluate} --help``.

With ``--json`` a command prints exactly one JSON object on stdout; progress goes to
stderr. User errors print one message (what went wrong, what to do) and exit with 2;
under ``--json`` the object is ``{"error", "type", "exit_code"}``, argument errors included.

Building the parser imports nothing heavy (torch, numpy, Pillow): ``phpn --help``, ``--version``
and argument errors answer at once; each command imports what it needs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from phpn.config import COLOURS, INTERPOLATIONS
from phpn.errors import PhpnError

if TYPE_CHECKING:
    from phpn.images.preprocess import Preprocess

USAGE_EXIT = 2  # argparse's exit code for a wrong command line, and phpn's for a user's mistake


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--demo", help="a built-in demo: fashion-mnist or imagenet-lite0 (instead of --checkpoint)")
    g.add_argument("--checkpoint", type=Path, help="state dict (.pt/.pth/.bin/.safetensors), a Hugging Face model folder "
                   "(save_pretrained), or, with --trust-pickle, a pickled model")
    g.add_argument("--arch", help="torchvision architecture name, or timm/NAME for a timm model "
                   "(inferred from the checkpoint when omitted)")
    g.add_argument("--model-def", metavar="FILE.py:FACTORY",
                   help="your own architecture: a Python file and the class or function that builds it (the file is executed)")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow a whole pickled model; only for files you trust, since unpickling runs code")
    g.add_argument("--num-classes", type=int, help="expected number of classes (checked against the checkpoint)")
    g.add_argument("--class-names", type=Path, help="text file with one class name per line (or a JSON list)")
    g.add_argument("--feature-layer", help="name of the layer whose output is the feature map, if detection fails")
    g.add_argument("--head-layer", help="name of the linear head layer, if detection fails")
    g = p.add_argument_group("preprocessing (defaults from the model)")
    g.add_argument("--resize", type=int)
    g.add_argument("--crop", type=int)
    g.add_argument("--mean", type=float, nargs="+")
    g.add_argument("--std", type=float, nargs="+")
    g.add_argument("--interpolation", choices=list(INTERPOLATIONS))
    g.add_argument("--colour", choices=list(COLOURS),
                   help="how a 3-channel model gets the colours: rgb (default), bgr (channel order reversed), grey "
                        "(the grey image in each channel)")


def _overrides(args) -> dict:
    """The preprocessing flags given (merged into the model's own by phpn.images.inputs.merge_preprocess)."""
    return {name: getattr(args, name, None) for name in ("resize", "crop", "mean", "std", "interpolation", "colour")}


def _session(args, preprocess: Optional[Preprocess] = None):
    """Open the model the flags name; the preprocessing flags (over ``preprocess``, e.g. a run's
    own) are merged before the doctor runs, so it diagnoses the input size that will be used."""
    from phpn.api import open_model, read_class_names

    if not args.demo and not args.checkpoint:
        raise PhpnError("No model given.", "Pass --checkpoint PATH or --demo NAME.")
    names = read_class_names(args.class_names) if args.class_names else None
    session = open_model(args.checkpoint, demo=args.demo, arch=args.arch, model_def=args.model_def,
                         trust_pickle=args.trust_pickle, num_classes=args.num_classes, class_names=names,
                         feature_layer=args.feature_layer, head_layer=args.head_layer, preprocess=preprocess,
                         overrides=_overrides(args))
    return session


def _data_dir(args, session):
    if args.data:
        return args.data
    if session.demo:
        from phpn.demos import get_demo

        return get_demo(session.demo).discovery_dir()
    raise PhpnError("No image folder given.", "Pass --data DIR (one sub-folder of images per class).")


def _emit(args, obj: dict, text: str) -> None:
    if args.json:
        print(json.dumps(obj))
    else:
        print(text)


def cmd_doctor(args) -> int:
    session = _session(args)
    d = session.diagnosis
    obj = {"checkpoint": str(args.checkpoint or args.demo), "arch": session.loaded.arch,
           "num_classes": session.loaded.num_classes, "sha256": session.loaded.sha256, **d.to_dict(),
           "preprocess": session.preprocess.to_dict(), "load_notes": list(session.loaded.notes)}
    lines = [f"model: {session.loaded.arch} ({session.loaded.num_classes} classes)", f"verdict: {d.verdict}",
             f"why: {d.reason}", f"preprocessing: {session.preprocess.describe()}"]
    lines += [f"loaded: {n}" for n in session.loaded.notes if not n.startswith("preprocessing: ")]
    if d.split is not None:
        lines.append(f"features: {d.split.feature_layer} -> head: {d.split.head_layer}, feature map {tuple(d.feature_shape)}")
    lines += [f"note: {n}" for n in d.notes]
    _emit(args, obj, "\n".join(lines))
    return 0 if d.split is not None else 3


def cmd_discover(args) -> int:
    from phpn.api import open_data, resolve_discovery, run_discovery
    from phpn.progress import TqdmProgress
    from phpn.runs.store import check_run_target, save_run

    check_run_target(args.out, args.overwrite)  # before any work: a bad --out fails at once
    session = _session(args)
    config = resolve_discovery(
        session.demo, class_names=session.class_names, k=args.k, k_max=args.k_max,
        images_per_class=args.images_per_class, solver=args.solver, nmf_solver=args.nmf_solver,
        objective=args.objective, scaling=args.scaling, contributions=args.contributions, holdout=args.holdout,
        nmf_data=args.nmf_data, suggest_k=args.suggest_k, lbfgs_iter=args.lbfgs_iter, seed=args.seed,
        device=args.device, batch_size=args.batch_size, classes=args.classes, memory_budget_mb=args.memory_budget)
    cap = config.images_per_class
    data_dir = _data_dir(args, session)
    data = open_data(session, data_dir, cap, args.seed)
    held_out = open_data(session, args.held_out, None, args.seed) if args.held_out else None
    from phpn.pipeline import distributed
    from phpn.runs.resume import discard_progress, progress_dir_for

    shard = distributed.from_environment(args.device)
    bar = TqdmProgress(disable=args.quiet or (shard is not None and shard.rank != 0))
    label = f"demo:{session.demo}" if session.demo and not args.data else str(data_dir)
    try:
        run = run_discovery(session, data, config, progress=bar, data_label=label, held_out=held_out,
                            progress_dir=progress_dir_for(args.out), resume=args.resume, workers=args.workers,
                            decode=args.decode, shard=shard)
    except KeyboardInterrupt:
        print("\ninterrupted: the finished groups of classes are saved; run the same command with --resume "
              "to continue", file=sys.stderr)
        return 130
    finally:
        bar.close()
        distributed.close(shard)
    if run is None:  # another rank than 0: rank 0 writes the run
        return 0
    path = save_run(run, args.out, overwrite=args.overwrite)
    discard_progress(progress_dir_for(args.out))
    cert = run.recorded_certificate or {}
    t = run.timings
    obj = {"run": str(path), "classes": len(run.class_records), "k": run.k, "timings": t, "certificate": cert,
           "skipped": run.data_info["skipped"], "chance_warning": _warn_if_chance(cert)}
    from phpn.method.part_metrics import part_metrics_summary

    fid = [f for c in run.class_records for f in c["fidelity"]]
    ks = [c.get("k", run.k) for c in run.class_records]
    obj["k_per_class"] = {c["index"]: k for c, k in zip(run.class_records, ks)}
    shape = (f"{run.k} prototypes" if min(ks) == max(ks) else
             f"{min(ks)} to {max(ks)} prototypes ({sum(ks)} in all, each class's k at its elbow)")
    text = (f"saved {path}: {len(run.class_records)} classes x {shape} in {t['total_s']:.1f}s "
            f"(waiting for images {t['decode_wait_s']:.1f}s, features {t['features_s']:.1f}s, "
            f"NMF {t['nmf_s']:.1f}s, refinement {t['refine_s']:.1f}s, certificate {t['certify_s']:.1f}s)\n"
            f"map fidelity: median {sorted(fid)[len(fid) // 2]:.3f}, min {min(fid):.3f}\n"
            f"{part_metrics_summary(run.class_records)}\n"
            f"certificate: {_cert_text(cert)}")
    held = run.held_out_certificate
    if held:
        obj["certificate_held_out"] = held
        obj["chance_warning"] = obj["chance_warning"] or _warn_if_chance(held)
        text += f"\nheld-out certificate: {_cert_text(held)}"
    if run.data_info["skipped"]:
        text += f"\nskipped {len(run.data_info['skipped'])} unreadable files (see run.json)"
    from phpn.images.folders import describe_class_mapping

    obj["class_mapping"] = run.data_info.get("class_mapping", {})
    text += "\n" + describe_class_mapping(obj["class_mapping"])
    _emit(args, obj, text)
    return 0


def _cert_text(cert: dict) -> str:
    from phpn.method.certify import format_certificate

    return format_certificate(cert)


def _warn_if_chance(cert: Optional[dict]) -> Optional[str]:
    """Print the near-chance warning on stderr, before any result; return it for --json."""
    from phpn.method.certify import chance_warning

    warning = chance_warning(cert)
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr)
    return warning


def _run_session(args):
    """The run and the model it was made from (the checkpoint or demo given, else the one the run
    records), opened through the library's one door; the network reads a class's shard when needed."""
    from phpn.api import open_run, read_class_names

    names = read_class_names(args.class_names) if args.class_names else None
    run = open_run(args.run, args.checkpoint or None, require_model=True, demo=args.demo, arch=args.arch,
                   model_def=args.model_def, trust_pickle=args.trust_pickle, num_classes=args.num_classes,
                   class_names=names, feature_layer=args.feature_layer, head_layer=args.head_layer,
                   overrides=_overrides(args))
    if "given" in run.preprocess_info:
        raise PhpnError("This run was decomposed in Python from images preprocessed there.",
                        "Open it with phpn.open_run(path, model) in Python.")
    return run.session, run, run.lazy_network(run.session.split)


def cmd_certify(args) -> int:
    from phpn.api import certify_run, open_data

    session, run, _ = _run_session(args)
    data = open_data(session, _data_dir(args, session), args.images_per_class, 0)
    cert = certify_run(session, run, data, args.batch_size, args.device)
    obj = cert.to_dict()
    obj["chance_warning"] = _warn_if_chance(obj)
    _emit(args, obj, _cert_text(obj))
    return 0 if cert.passed else 1


def cmd_verify(args) -> int:
    import time

    from phpn.runs.store import verify_run

    start = time.perf_counter()
    run = verify_run(args.run)  # every shard read and checked; any failure is a RunError
    seconds = time.perf_counter() - start
    shards = run.shard_index  # format 2: a head file and two files a shard; format 1: one tensors file
    obj = {"run": str(args.run), "format_version": run.format_version, "classes": len(run.class_indices),
           "k": run.k, "files_checked": 1 + 2 * len(shards) if shards is not None else 1,
           "seconds": round(seconds, 3)}
    _emit(args, obj, f"{args.run}: format {obj['format_version']}, {obj['classes']} classes × k = {run.k}; every "
                     f"file matches its checksum, every value is finite and each class's prototypes sum to its "
                     f"head row ({seconds:.1f} s).")
    return 0


def cmd_import_run(args) -> int:
    from phpn.api import import_run

    folder = import_run(args.zip, args.into, name=args.name)  # verified whole, never over anything
    _emit(args, {"zip": str(args.zip), "run": str(folder)},
          f"{args.zip} -> {folder}: a complete run, every file checked (open it with phpn explain {folder} ...).")
    return 0


def cmd_explain(args) -> int:
    from phpn.api import class_index as find_class
    from phpn.api import explain_image

    session, run, network = _run_session(args)
    class_index = None
    if args.class_ is not None:
        class_index = find_class(args.class_, session.class_names)
    warning = _warn_if_chance(run.recorded_certificate)
    if args.out is not None:
        return _explain_to_folder(args, session, run, network, class_index)
    if len(args.images) != 1 or args.images[0].is_dir():
        raise PhpnError("Several images (or a folder) are explained into a folder.", "Pass --out DIR.")
    ex = explain_image(session, network, args.images[0], class_index)
    obj = ex.to_dict()
    obj["chance_warning"] = warning
    obj["prototypes"] = [{"prototype": i, "contribution": float(c)} for i, c in enumerate(ex.contributions)]
    lines = ["top-5:"] + [f"  {n} (class {c}): logit {lg:.3f}, p = {p:.3f}" for c, n, lg, p in ex.top]
    lines.append(f"class {ex.class_name} ({ex.class_index}): logit {ex.logit:.4f}")
    lines += [f"  prototype {i}: {c:+.4f}" for i, c in enumerate(ex.contributions)]
    lines.append(f"  bias: {ex.bias:+.4f}")
    lines.append(f"  contributions + bias = {ex.contributions.sum() + ex.bias:.4f}")
    _emit(args, obj, "\n".join(lines))
    return 0


def _explain_to_folder(args, session, run, network, class_index) -> int:
    from phpn.api import EXPLANATIONS_SUMMARY, explain_to_folder
    from phpn.progress import TqdmProgress

    bar = TqdmProgress(disable=args.json)
    try:
        summary = explain_to_folder(session, run, args.images, args.out, class_index=class_index, progress=bar,
                                    network=network, resume=args.resume, overwrite=args.overwrite,
                                    formats=args.formats)
    except KeyboardInterrupt:
        print("\ninterrupted: the explanations written so far are kept; run the same command with --resume "
              "to finish them", file=sys.stderr)
        return 130
    finally:
        bar.close()
    obj = {"out": str(args.out), "summary": str(args.out / EXPLANATIONS_SUMMARY), "images": summary["images"],
           "explained": len(summary["explained"]), "skipped": summary["skipped"]}
    text = (f"explained {len(summary['explained'])} of {summary['images']} images into {args.out} "
            f"({' and '.join(f.upper() for f in summary['formats'])} each; summary in {EXPLANATIONS_SUMMARY})")
    if summary["skipped"]:
        text += "\n" + "\n".join(f"skipped {s['image']}: {s['why']}" for s in summary["skipped"])
    _emit(args, obj, text)
    return 0


def cmd_check_preprocessing(args) -> int:
    from phpn.api import open_data
    from phpn.pipeline.preprocess_check import check_preprocessing
    from phpn.progress import TqdmProgress

    session = _session(args)
    data = open_data(session, _data_dir(args, session))
    bar = TqdmProgress(disable=args.json)
    check = check_preprocessing(session, data, images_per_class=args.images_per_class,
                                **({"sizes": tuple(args.sizes)} if args.sizes else {}), progress=bar)
    bar.close()
    lines = [f"{check.images} labelled images of {check.classes} classes; settings ranked by the model's accuracy:"]
    for row in check.table():
        acc = "fails" if row["accuracy"] is None else f"{100 * row['accuracy']:5.1f}%"
        lines.append(f"  {acc} ({row['right']})  resize {row['resize']}, crop {row['crop']}, "
                     f"{row['normalisation']}, {row['channels']}  [{row['setting']}]"
                     f"{'  ' + row['note'] if row['note'] else ''}")
    lines.append(check.proposal())
    _emit(args, check.to_dict(), "\n".join(lines))
    return 0


def cmd_evaluate(args) -> int:
    from phpn.evaluate import evaluate_run, summary_text
    from phpn.progress import TqdmProgress

    session, run, _ = _run_session(args)
    bar = TqdmProgress(disable=args.json)
    result = evaluate_run(run, session.split, session.preprocess, _data_dir(args, session), parts_root=args.parts,
                          progress=bar)
    bar.close()
    _emit(args, result, summary_text(result))
    return 0


def _kept_line(audit) -> str:
    return f"Kept beside the run: {audit.saved_to}" if audit.saved_to else audit.save_note


def cmd_audit(args) -> int:
    if args.last:
        from phpn.api import read_run, saved_audit

        kept = saved_audit(read_run(args.run))
        if kept is None or kept.audit is None:
            problem = kept.note if kept is not None else f"No audit is kept beside the run at {args.run}."
            raise PhpnError(problem, f"Audit it: phpn audit {args.run} --data DIR.")
        _emit(args, {**kept.audit.to_dict(), "saved_to": str(kept.path), "saved_at": kept.saved_at},
              f"{kept.audit.text()}\nKept beside the run: {kept.path} ({kept.saved_at})")
        return 0
    session, run, _ = _run_session(args)
    data = args.data if args.data else None
    if data is None and session.demo:
        data = _data_dir(args, session)
    from phpn.progress import TqdmProgress

    bar = TqdmProgress(disable=args.json)
    try:
        audit = run.audit(data, **({"images_per_class": args.images_per_class} if args.images_per_class else {}),
                          progress=bar)
    finally:
        bar.close()
    _emit(args, {**audit.to_dict(), "saved_to": audit.saved_to, "save_note": audit.save_note},
          f"{audit.text()}\n{_kept_line(audit)}")
    return 0


def cmd_compare(args) -> int:
    from phpn.api import compare, open_run

    runs = []
    for path, checkpoint, model_def in ((args.run_a, args.checkpoint_a, args.model_def_a),
                                        (args.run_b, args.checkpoint_b, args.model_def_b)):
        runs.append(open_run(path, checkpoint, require_model=True, model_def=model_def,
                             trust_pickle=args.trust_pickle))
    options = {"images_per_class": args.images_per_class} if args.images_per_class else {}
    if args.threshold is not None:
        options["threshold"] = args.threshold
    result = compare(runs[0], runs[1], args.data, progress=not args.json, **options)
    _emit(args, result.to_dict(), result.text())
    return 0


def _k_value(text: str):
    """--k: a whole number, or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got '{text}'") from None


def build_parser() -> argparse.ArgumentParser:
    from phpn import __version__
    from phpn import config as D

    # Named as it was started: the console script "phpn" or "python -m phpn".
    prog = "python -m phpn" if Path(sys.argv[0]).name == "__main__.py" else "phpn"
    parser = _Parser(prog=prog, description="Post-hoc part-prototype networks.")
    parser.add_argument("--version", action="version", version=f"phpn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("discover", help="discover and refine part-prototypes; save a run")
    _add_model_args(p)
    p.add_argument("--data", type=Path, help="image folder, one sub-folder per class (the demo's own with --demo)")
    p.add_argument("--k", type=_k_value, help=f"prototypes per class (default {D.K}, or the demo's); 'auto': each "
                   f"class its own, at the elbow of NMF's error, 2 to --k-max (default {D.AUTO_K_MAX})")
    p.add_argument("--k-max", type=int, help=f"with --k auto, the most prototypes a class may get "
                   f"(default {D.AUTO_K_MAX})")
    p.add_argument("--images-per-class", type=int,
                   help="cap per class, sampled deterministically (default: every image, or the demo's)")
    p.add_argument("--solver", choices=D.SOLVERS, help=f"refinement solver (default {D.SOLVER}, or the demo's)")
    p.add_argument("--lbfgs-iter", type=int, default=D.LBFGS_ITER,
                   help=f"refinement's L-BFGS iterations per class at most (default {D.LBFGS_ITER}; "
                        "each class stops when solved, and the run says which did not)")
    p.add_argument("--nmf-solver", choices=D.NMF_SOLVERS, default=D.NMF_SOLVER,
                   help="hals: batched, GPU when present (default); sklearn: the reference, class by class")
    p.add_argument("--objective", choices=D.OBJECTIVES, default=D.OBJECTIVE)
    p.add_argument("--scaling", choices=D.SCALINGS, default=D.SCALING)
    p.add_argument("--contributions", choices=D.CONTRIBUTIONS, default=D.CONTRIBUTION,
                   help="part: each prototype's mean contribution is held at its NMF part's share (no cancelling); "
                        "free: left to the map objective")
    p.add_argument("--nmf-data", choices=D.NMF_DATA_CHOICES, default=D.NMF_DATA,
                   help="features that can be negative (ConvNeXt, ViT): clamped = NMF on max(F, 0) (default); "
                        "signed = semi-NMF on F itself (parts may have negative channels)")
    p.add_argument("--suggest-k", type=int, metavar="K_MAX",
                   help="also factorise each class with k = 2..K_MAX and record the k where NMF's error curve bends, "
                        "with the reason (each class record: k_suggested, k_reason)")
    p.add_argument("--holdout-fraction", dest="holdout", type=float, default=D.HOLDOUT, metavar="FRACTION",
                   help="keep this fraction of each class's images out of discovery and report the prototypes' "
                        "fidelity and specificity on them (default 0; --held-out DIR certifies another folder)")
    p.add_argument("--seed", type=int, default=D.SEED)
    p.add_argument("--device", default=D.DEVICE, help="auto, cpu or cuda")
    p.add_argument("--batch-size", type=int, default=D.BATCH_SIZE)
    p.add_argument("--out", type=Path, required=True,
                   help="new or empty folder to write the run to; phpn never writes over anything else")
    p.add_argument("--overwrite", action="store_true", help="replace the run already saved at --out")
    g = p.add_argument_group("scale (torchrun --nproc_per_node N -m phpn discover ... shards the classes)")
    g.add_argument("--classes", help="decompose only these classes: indices, ranges and names, e.g. 0,5-9,Bag")
    g.add_argument("--memory-budget", type=int, metavar="MB",
                   help="features held at once, per group of classes (default 2048; 0: one class at a time)")
    g.add_argument("--workers", type=int, help="image decoding processes (default: the cores less one)")
    g.add_argument("--decode", choices=list(D.DECODES), default=D.DECODE,
                   help="where JPEGs are decoded: gpu (in batches, on the model's CUDA device), cpu (Pillow, in "
                        "the decoding processes), auto (default: gpu when the model runs on CUDA)")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted discovery into the same --out, keeping its finished groups")
    g.add_argument("--held-out", type=Path, metavar="DIR",
                   help="images not used for discovery, certified separately (same folder layout)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_discover)

    p = sub.add_parser("certify", help="check that a run reproduces the model's logits")
    p.add_argument("run", type=Path)
    _add_model_args(p)
    p.add_argument("--data", type=Path)
    p.add_argument("--images-per-class", type=int)
    p.add_argument("--device", default=D.DEVICE)
    p.add_argument("--batch-size", type=int, default=D.BATCH_SIZE)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_certify)

    p = sub.add_parser("verify", help="check all of a saved run now: every file's checksum, finite values, "
                                      "each class's prototypes summing to its head row (opening checks a class "
                                      "when it is first needed)")
    p.add_argument("run", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("import-run", help="take in a run's zip (the app's Export page) as a new run folder, checked "
                                          "whole (archive, checksums, seal) and never written over anything")
    p.add_argument("zip", type=Path)
    p.add_argument("--into", type=Path, default=Path("."), help="the folder the run goes into (default: here)")
    p.add_argument("--name", help="the run folder's name (default: the zip's; -2, -3, ... when taken)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_import_run)

    p = sub.add_parser("explain", help="explain images with a run's prototypes (one, or many into --out)")
    p.add_argument("run", type=Path)
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--out", type=Path, help="folder for a PNG and an HTML page per image and explanations.json")
    p.add_argument("--formats", nargs="+", choices=D.EXPLAIN_FORMATS, default=list(D.EXPLAIN_FORMATS),
                   help="what --out holds per image (default: both; one alone halves the folder)")
    p.add_argument("--class", dest="class_", help="class index or name (default: the top decomposed class)")
    p.add_argument("--resume", action="store_true",
                   help="finish an interrupted --out folder: images already explained there are skipped")
    p.add_argument("--overwrite", action="store_true", help="replace the explanations phpn wrote in --out")
    _add_model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("check-preprocessing",
                       help="try the usual input sizes and normalisations on labelled images; propose the best")
    _add_model_args(p)
    p.add_argument("--data", type=Path, help="image folder, one sub-folder per class (the demo's own with --demo)")
    p.add_argument("--images-per-class", type=int, default=D.CHECK_IMAGES_PER_CLASS,
                   help=f"labelled images tried per class (default {D.CHECK_IMAGES_PER_CLASS}, or all of a smaller class)")
    p.add_argument("--sizes", type=int, nargs="+", help="input sizes to try (default 28 32 64 96 128 224 256 299 384)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check_preprocessing)

    p = sub.add_parser("doctor", help="say whether a checkpoint decomposes exactly, and why")
    _add_model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("evaluate", help="consistency, stability and faithfulness of a run's prototypes")
    p.add_argument("run", type=Path)
    _add_model_args(p)
    p.add_argument("--data", type=Path)
    p.add_argument("--parts", type=Path, help="root of a CUB-200-2011-layout part annotation")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("audit", help="rank every prototype of a run by how much a person should look at it first "
                                     "(shortcuts: fixed place, one look, everywhere, causal paste/remove, reliance)")
    p.add_argument("run", type=Path)
    _add_model_args(p)
    p.add_argument("--data", type=Path, help="labelled images, one sub-folder per class (default: the run's own "
                   "discovery folder)")
    p.add_argument("--images-per-class", type=int, help=f"labelled images read per class (default {D.AUDIT_IMAGES_PER_CLASS})")
    p.add_argument("--last", action="store_true", help="show the audit kept beside the run (audit.json) instead of "
                   "measuring again; no model needed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("compare", help="match the prototypes of two runs class by class (one-to-one, on the "
                                       "correlation of their maps on the same images)")
    p.add_argument("run_a", type=Path, metavar="RUN_A")
    p.add_argument("run_b", type=Path, metavar="RUN_B")
    g = p.add_argument_group("models (default: the one each run records)")
    g.add_argument("--checkpoint-a", type=Path, help="RUN_A's model, when the run does not find it")
    g.add_argument("--checkpoint-b", type=Path, help="RUN_B's model, when the run does not find it")
    g.add_argument("--model-def-a", metavar="FILE.py:FACTORY", help="RUN_A's architecture (the file is executed)")
    g.add_argument("--model-def-b", metavar="FILE.py:FACTORY", help="RUN_B's architecture (the file is executed)")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow whole pickled models; only for files you trust, since unpickling runs code")
    p.add_argument("--data", type=Path, help="labelled images, one sub-folder per class (default: RUN_A's "
                   "discovery folder, else RUN_B's)")
    p.add_argument("--images-per-class", type=int, help="images per class the maps are compared on (default "
                   f"{D.COMPARE_IMAGES_PER_CLASS})")
    p.add_argument("--threshold", type=float, help="similarity below which a pair is not a match (default "
                   f"{D.MATCH_THRESHOLD:g})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("app", help="start the app in the browser (needs phpn[app]); Streamlit's own flags pass "
                                   "through, e.g. phpn app --server.port 8502",
                       prefix_chars="\0")  # every argument goes to Streamlit untouched
    p.add_argument("streamlit_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_app)
    return parser


def cmd_app(args) -> int:
    """Streamlit runs the installed app's entry point, from any folder."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("streamlit") is None:
        raise PhpnError("The app needs Streamlit, which is not installed.", 'Install it with: pip install "phpn[app]"')
    entry = importlib.util.find_spec("phpn.app.serve").origin  # the app with its HttpOnly browser-key cookie
    return subprocess.call([sys.executable, "-m", "streamlit", "run", entry, *args.streamlit_args])


def _check_options(args) -> None:
    """Refuse impossible numbers before any model is loaded (the same checks the library makes)."""
    from phpn.validation import (
        check_at_least,
        check_finite,
        check_input_side,
        check_seed,
    )

    if getattr(args, "seed", None) is not None:
        check_seed(args.seed)
    for flag in ("batch_size", "images_per_class", "k", "k_max"):
        if getattr(args, flag, None) not in (None, "auto"):
            check_at_least("--" + flag.replace("_", "-"), getattr(args, flag))
    for flag in ("resize", "crop"):
        if getattr(args, flag, None) is not None:
            check_input_side("--" + flag, getattr(args, flag))
    for size in getattr(args, "sizes", None) or ():
        check_input_side("--sizes", size)
    for flag in ("mean", "std"):
        if getattr(args, flag, None) is not None:
            check_finite("--" + flag, getattr(args, flag))
    if getattr(args, "device", None) is not None:
        from phpn.device import check_device_name  # imports torch, which the command needs next anyway

        check_device_name(args.device)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are also one JSON object on stdout under ``--json``."""

    json_errors = False  # set by main() from the command line it parses (sub-parsers share the class)

    def error(self, message: str):
        if self.json_errors:
            print(json.dumps(_error_object("UsageError", f"{message} (see {self.prog} --help)", USAGE_EXIT)))
        super().error(message)


def _error_object(kind: str, message: str, code: int) -> dict:
    return {"error": message, "type": kind, "exit_code": code}


def _memory_errors() -> tuple:
    """MemoryError, and CUDA's out-of-memory error when torch was imported (only then can it occur)."""
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return (MemoryError,) if oom is None else (MemoryError, oom)


def main(argv: Optional[list] = None) -> int:
    words = sys.argv[1:] if argv is None else [str(a) for a in argv]
    _Parser.json_errors = "--json" in words
    args = build_parser().parse_args(argv)
    try:
        _check_options(args)
        return args.func(args)
    except (PhpnError, OSError, *_memory_errors()) as err:  # evaluated when raised: torch is loaded by then
        if isinstance(err, PhpnError):
            message = str(err)
        elif isinstance(err, OSError):  # a file or folder the user named cannot be read or written
            message = f"{err.strerror or err}: {err.filename or ''}".strip()
        else:
            message = ("There is not enough memory for this work. Lower --batch-size or --memory-budget, "
                       "use fewer images per class, or a smaller input size.")
        message = " ".join(message.split())  # one line, whatever the message held
        kind = type(err).__name__ if isinstance(err, PhpnError) else (
            "FileError" if isinstance(err, OSError) else "OutOfMemory")
        if getattr(args, "json", False):
            print(json.dumps(_error_object(kind, message, USAGE_EXIT)))
        print(f"error: {message}", file=sys.stderr)
        return USAGE_EXIT
