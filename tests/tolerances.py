"""The one tolerance policy for every parity test of jaxdiff against PyTorch (CPU, float32).

Both sides compute in float32; they differ only by the order of floating-point operations
(XLA's and oneDNN's convolutions and reductions). Never loosen these to make a test pass:
a mismatch above them is a bug to find.
"""

import numpy as np

# |actual - expected| <= ATOL + RTOL * |expected|, elementwise.
FLOAT32_ATOL = 1e-4
FLOAT32_RTOL = 1e-4


def assert_close(actual, expected, what=""):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual - expected)
    bound = FLOAT32_ATOL + FLOAT32_RTOL * np.abs(expected)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (
        f"{what}: max abs err {err.max():.3g} (at {worst}: {actual[worst]!r} vs {expected[worst]!r}); "
        f"tolerance {FLOAT32_ATOL} + {FLOAT32_RTOL}*|ref|"
    )
