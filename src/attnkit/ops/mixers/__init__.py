"""Attention-free and convolutional token mixers (CATALOGUE-FULL.md section F, issue 12).

Each mixer maps ``x [batch, seq, channels]`` (or ``[batch, *spatial, channels]`` for 2-D/3-D papers) to the same
shape. The functions here are the math (fast paths beside plain references); the ``nn.Module`` wrappers that own
the weights are in :mod:`attnkit.nn.mixers`; :mod:`attnkit.records.mixers` registers them.
"""
