"""The figures of a scan, a checkpoint series and a correlation, one module per family.

``common``       labels, colours, tick and save helpers shared by the scan figures
``scans``        reading a scan's output folder (one-line errors), prompt rows, sibling scans
``depth``        L x L depth-wise coupling heatmaps (paper Fig. 3)
``tokens``       the three n x n token-wise coupling maps (Fig. 4)
``layers``       per-layer curves: norm, windowed LSS, step size, entropy (Fig. 24)
``spectra``      top-K singular values of J^l_tt per layer, with the K/K+1 gap
``pca``          token trajectories in the 2-D PCA plane (Fig. 16-17)
``training``     coupling and LSS against the training step, layer-adjacency graphs (Fig. 1, 25)
``correlation``  ``coupling correlate``: scatters with fits, R² bars (Fig. 1a, 8, 9)

:mod:`coupling.report` assembles a scan's figures (``coupling report DIR``).  Conventions:
layers are 1-based in every label (block ``l`` maps ``X^{l-1}`` to ``X^l``; hidden state
``0`` is the embedding); arrays are 0-based.  Mis-coupling m~ is in [0, 1], lower = more
strongly coupled; "coupling strength" is 1 - m~.  No pyplot: figures are plain
``matplotlib.figure.Figure`` objects (Agg), so drawing never touches a global backend.
"""
