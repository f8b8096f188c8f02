"""Kernel templates (Triton, C++), each with a dense reference."""
