"""One prompt's analysis: the per-layer steps (Jacobians -> SVD factors -> coupling rows -> regularity -> PromptResult) that the local scan and the Ray stages both call.

May import: coupling.settings, coupling.measures, coupling.spectrum, coupling.jacobian, coupling.model.
"""
