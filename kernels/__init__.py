"""Triton kernels of kvstore, installed as the package ``kvstore.kernels``.

Each kernel lives beside a pure-PyTorch reference of the same computation; tests
compare the two (under TRITON_INTERPRET=1 on the CPU, natively on a GPU).
"""
