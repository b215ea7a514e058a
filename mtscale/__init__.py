"""mtscale: self-supervised pre-training of Motion-Transformers on skeleton sequences.

Axis letters, fixed across the project: N batch, T frames, M bodies, V joints, C coordinates.
A sample is stored and read as ``x_TMVC`` (float); a batch is ``x_NTMVC``.
"""

__version__ = "0.1.0"
