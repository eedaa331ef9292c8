"""The Triton kernels of block-sparse attention and their host side.

forward.py and backward.py hold the kernels (forward; dq then dk/dv), common.py the Triton helpers
they share, configs.py the launch configs and the plans each kernel tries, launch.py the entry
points the op calls (``forward``, ``backward``) with the launch machinery. Importing this package
imports nothing: configs.py needs no triton, the others are imported on first use of a GPU (or of
the interpreter, ``TRITON_INTERPRET=1``).
"""
