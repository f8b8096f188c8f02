"""Propagation rules, one module per op family, registered into sparta.registry on import."""
