"""The light room at the bottom: settings, errors, model specs, prompts, vector maths,
cell-to-text rules and the types that cross process boundaries.

It imports nothing from the other rooms and no torch, Ray or web framework, so every
room above it (and the desktop add-in) can use it.
"""
