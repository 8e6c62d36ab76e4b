"""Test-session setup shared by all modules."""

import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; the flag must be
# set before Triton is first imported. Only fused=True paths on CPU use it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
