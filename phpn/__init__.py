"""phpn: post-hoc part-prototype networks for trained image classifiers."""

__version__ = "0.1.0"
