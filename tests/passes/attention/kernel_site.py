"""The module the kernel lowering tests export: one attention kernel called on (q, k, v, mask)."""

import torch


class KernelSite(torch.nn.Module):
    """``kernel(q, k, v, mask)`` as a module of its own, so it can be exported and compiled."""

    def __init__(self, kernel: torch.nn.Module) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, q, k, v, mask):
        return self.kernel(q, k, v, mask)
