"""Triton kernels, one file per op family. Importing this package requires triton."""
