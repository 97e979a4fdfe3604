"""The ops the model is written with, and host settings (XLA:CPU) and sub-batches.

`dense`, `split_dense`, `matmul`, `einsum`, `add`, `gelu`, `conv` and `max_pool` are the plain
JAX ops on GPU and TPU.
On the CPU each traces as the XLA:CPU workaround written beside it, unless
`cpu_workarounds(False)` encloses the trace (see `selection`; figures in docs/performance.md).
"""
from sparseformer_jax.ops.activation import gelu
from sparseformer_jax.ops.conv import conv
from sparseformer_jax.ops.linear import add, dense, einsum, matmul, split_dense
from sparseformer_jax.ops.pool import max_pool
from sparseformer_jax.ops.selection import cpu_workarounds, use_cpu_workarounds
