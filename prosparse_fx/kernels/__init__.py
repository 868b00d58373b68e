"""Sparse-FFN kernels (``torch.library`` custom ops with reference, CPU and Triton
implementations). Empty until the kernel issue lands."""
