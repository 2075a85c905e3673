"""Locks shared across stages (a bundled model's conversion, assembly, the projection fusion)."""

from __future__ import annotations

import threading

# accelerate's init_empty_weights() patches nn.Module.register_parameter for the whole process:
# while one thread makes a model on meta, a parameter any other thread registers (a build's
# assignment, fused projections, a model loading) lands on meta too. Everything that makes or
# assigns parameters holds this lock; it is held for fractions of a second.
PARAMETERS_LOCK = threading.Lock()
