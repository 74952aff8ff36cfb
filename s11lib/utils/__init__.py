"""Utilities: train/test loops, accuracy, Grad-CAM, misclassified images, metric plots."""
