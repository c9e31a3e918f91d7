"""Top-K singular triplets of a Jacobian, whether they are determined (the s_K/s_{K+1} gap), and LN deflation.

May import: coupling.jacobian, coupling.model.
"""
