"""Backbones (Mamba, Transformer) behind one interface, with LM and task heads."""
