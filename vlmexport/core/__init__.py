"""Neutral building blocks shared by training, exporters and runtimes.

Nothing here imports torch, the model registry, the exporter or the training code, so
a runtime-only install (a Jetson image) can use all of it.
"""
