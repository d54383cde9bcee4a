"""Parallelism around the single-device model: mesh and shardings, stage layout, pipeline."""
