"""Triton kernels that write and read packed TurboQuant pages, with torch twins in reference.py."""
