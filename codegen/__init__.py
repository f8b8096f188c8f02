"""Source generation (Triton for GPU, C++ for CPU), compilation and the kernel cache."""
