"""Load a model (hub id, folder, ZeRO checkpoint, random from a config), find its blocks, replay one block's recorded call, and run the forward pass X^0..X^L.

May import: coupling.errors only.
"""
