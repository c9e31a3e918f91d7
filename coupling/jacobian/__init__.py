"""Block Jacobians of the residual branch as linear operators (matrix-free JVP/VJP products), including the one-token fast path.

May import: coupling.model.
"""
