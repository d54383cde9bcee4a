"""Hand-written accelerator kernels, each with a plain XLA twin."""
