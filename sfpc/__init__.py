"""SFPC Seg: semi-supervised segmentation with feature-perturbed consistency, with uncertainty."""

__version__ = "0.1.0"
