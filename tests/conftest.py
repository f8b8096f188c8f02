import os
import sys

# Generated Triton kernels run on the CPU in interpreter mode in CI; set before any import.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))
