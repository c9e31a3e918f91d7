"""Coupling matrices and mis-coupling (depth-wise and token-wise grids) and trajectory regularity (LSS, expodistance, ...).

May import: coupling.spectrum, coupling.jacobian, coupling.model.
"""
