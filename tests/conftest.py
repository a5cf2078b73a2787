"""Test-session setup that must happen before any test module imports triton.

Without a GPU, the Triton kernels run in Triton's interpreter, which is chosen by ``TRITON_INTERPRET=1``
at triton's first import (kernels notes §4); a GPU session leaves it unset and runs them natively.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
