import os
import sys

import torch

# Without a GPU, generated Triton kernels run in interpreter mode; it must be set before
# triton is imported. On a GPU machine compiled kernels run (the gpu-marked tests).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))
