"""Stand-ins for kernels a GPU may refuse, shared by the tests that need one on the CPU."""

import jax


def missing_kernel(operand, *like):
    """A call that traces and lowers, and fails when XLA compiles it: an FFI call to a kernel
    that no backend registers ("No FFI handler registered"), the way cuDNN refuses some graphs
    on some GPUs. Its results have the shapes and dtypes of `like`."""
    results = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in like)
    return jax.ffi.ffi_call("jaxdiff_test_missing_kernel", results)(operand)
