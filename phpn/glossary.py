"""Plain-language explanations of the words phpn shows, and when a prototype is flagged.

One home for this text: the app's help popovers and the reports read it from here,
so a word is explained the same way everywhere. Each entry is short enough for a tooltip and
written for a domain expert who has not studied machine learning.
"""
from __future__ import annotations

from typing import Optional

# Below this map fidelity a prototype's pictures (top patches, maps of its NMF part) may not
# show what it responds to: it is flagged wherever it is shown.
LOW_FIDELITY = 0.5

TERMS = {
    "logit": "The model's raw score for a class, before it is turned into a probability. Higher means the model "
             "leans more towards that class; the class with the highest score is the prediction.",
    "bias": "A fixed part of a class's score that does not depend on the image.",
    "prototype": "A part the model uses to recognise a class (for example a bird's head or a wheel), found "
                 "after training from the model's own features. A class's prototypes together make up exactly "
                 "the model's score for it, so the predictions do not change.",
    "contribution": "How much one prototype adds to (or, when negative, takes away from) a class's score on an "
                    "image: the average of its map. Score = bias + the sum of the contributions.",
    "map": "Where on the image a prototype responds: coloured where it adds to the score, grey hatching where it "
           "takes away. Each prototype is drawn on its own scale, so a weak one is still visible; the bars give "
           "the sizes.",
    "share": "A prototype's part of the class score (score − bias), in percent, averaged over the class's images.",
    "fidelity": "How closely the prototype's map follows the part it was found from (1 = exactly, 0 = not at "
                f"all). Below {LOW_FIDELITY:g}, its example patches may not be what it actually responds to.",
    "agreement": "How often the explained network gives the same prediction as the original model. It is "
                 "about faithfulness to the model, not about being right: a model can agree with itself on "
                 "every image and still be wrong on many.",
    "accuracy": "How often the original model's prediction matches the true class of labelled images.",
    "certificate": "A check on real images that the prototypes reproduce the model's scores exactly (up to "
                   "rounding), so the explanations describe the model itself, not an approximation.",
    "top patches": "The training image regions where the prototype responds most strongly, boxed, with each "
                   "region enlarged beside its image.",
    "shared parts": "Prototypes of other classes that point the same way in the model's feature space, i.e. "
                    "parts the model may reuse between classes.",
    # Expert details: the method's own quantities.
    "alpha": "α: the scale of a prototype's part found by non-negative matrix factorisation (NMF), fitted by "
             "least squares. A negative α means the part was subtracted rather than added.",
    "residual": "‖R‖/‖v‖: the fraction of the class's head row that the scaled NMF parts did not explain, before "
                "it was shared out among the prototypes.",
    "objective": "The refinement's criterion: how far the prototypes' maps are from their NMF parts' maps, before "
                 "and after the residual was shared out (lower is better).",
    "edited model": "A copy of the model with some prototypes switched off. It no longer equals the original model: "
                    "its predictions and accuracy are shown only to see what those prototypes do.",
}



def explain(term: str) -> str:
    """The plain-language explanation of ``term`` (a key of :data:`TERMS`)."""
    return TERMS[term]


def low_fidelity(fidelity: Optional[float]) -> bool:
    return fidelity is not None and float(fidelity) < LOW_FIDELITY


def fidelity_warning(fidelity: Optional[float]) -> Optional[str]:
    """The warning shown beside a prototype whose map fidelity is low, or None."""
    if not low_fidelity(fidelity):
        return None
    return (f"Low fidelity ({float(fidelity):.2f} < {LOW_FIDELITY:g}): its example patches and maps may not be what "
            "this prototype actually responds to; read it with care.")
