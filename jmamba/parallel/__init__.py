"""Parallelism that wraps the single-device model: expert dispatch over a mesh axis."""
