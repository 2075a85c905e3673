"""The residual-stream lens: capture, seam damage, block suggestions, plots."""
