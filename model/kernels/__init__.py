"""Hot-path kernels: Triton on GPU, plain-torch references on CPU.

Each public function checks its inputs and dispatches with ``use_triton``:
- ``model.kernels.mla_decode.paged_mla_decode``: absorbed-MLA decode attention over pages.
- ``model.kernels.fp8.quantize_latent_fp8`` / ``dequantize_latent_fp8`` (+ record helpers):
  the FP8 latent codec.

Tests run the Triton kernels on CPU with ``TRITON_INTERPRET=1 TIDAL_FORCE_TRITON=1`` (the first
must be set before Triton is imported).
"""

from __future__ import annotations

import os
from typing import Any


def use_triton(device: Any) -> bool:
    """Whether kernels on ``device`` (a torch.device) run in Triton: CUDA, or forced by env."""
    return device.type == "cuda" or os.environ.get("TIDAL_FORCE_TRITON", "0") == "1"
