"""phpn: post-hoc part-prototype networks for trained image classifiers.

Each class's row of the classifier head is decomposed into k part-prototypes whose sum is
exactly that row, so the decomposed network gives the model's own logits, and every logit
reads as a sum of "this part, here" contributions::

    import phpn

    run = phpn.decompose(model, loader, k=3)     # your nn.Module, your DataLoader of (images, labels)
    run.certify(test_loader)                     # agreement with the model: 100%, max |Δlogit|
    run.explain(image)                           # shows itself in Jupyter; .save("x.html" | "x.png")
    run.explain(batch, "cat")                    # a batch gives a list; a class by index or name
    print(run)                                   # model, classes, k, certificate, warnings (run.warnings)
    run.save("runs/mine"); phpn.open_run("runs/mine", model)

The same steps are the command line (``phpn --help``) and the app (``streamlit run app.py``).
Names below are imported on first use, so ``import phpn`` stays light.
"""

__version__ = "0.1.0"

# name -> module that defines it (imported when the name is first used)
_EXPORTS = {
    "decompose": "api", "open_model": "api", "open_run": "api", "load_run": "api", "merge_preprocess": "api",
    "resolve_discovery": "api",
    "DecomposedRun": "api", "ModelSession": "api", "ClassView": "api",
    "compare": "api",
    "Explanation": "show.explanation",
    "Certificate": "method.certify", "InputWarning": "method.certify",
    "Preprocess": "images.preprocess",
    "DiscoveryConfig": "pipeline.discover",
    "PrototypeNetwork": "method.network",
    "PhpnError": "errors",
    "config": None,
}

__all__ = ["__version__", *_EXPORTS]

# The public name for what decompose() returns.
_ALIASES = {"Run": ("api", "DecomposedRun"), "defaults": ("config", None)}
__all__ += ["Run", "defaults"]


def __getattr__(name: str):
    import importlib

    if name in _ALIASES:
        module, attr = _ALIASES[name]
        value = importlib.import_module(f".{module}", __name__)
        value = value if attr is None else getattr(value, attr)
    elif name in _EXPORTS:
        module = _EXPORTS[name]
        if module is None:
            value = importlib.import_module(f".{name}", __name__)
        else:
            value = getattr(importlib.import_module(f".{module}", __name__), name)
    else:
        raise AttributeError(f"module 'phpn' has no attribute '{name}'")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
