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


# Statistical tests of the stochastic samplers (tests/test_samplers.py): 16384 samples drawn
# with the exact denoiser of a N(0.5, 0.8^2) target in 50 steps. Allowed |error| of the sample
# mean and of the sample standard deviation: 5 Monte-Carlo standard errors (0.8 / sqrt(16384)
# = 0.006 for the mean, 0.0044 for the std) plus the discretization bias of a first-order
# ancestral sampler at 50 steps (it shrinks the std by ~2.6 / steps: 0.052 measured for Euler
# ancestral and DDPM). A missing, doubled or mis-scaled noise term is off by far more.
SAMPLER_MOMENT_ATOL = 0.08

# Reduced precision, checked against a float32 (or float64) reference rather than PyTorch.
# bfloat16 keeps 8 significant bits (rounding 2^-9 = 0.2% per operation); over the ~40
# layers of a tiny UNet the relative L2 error of the output grows to 1.4-1.6% (three seeds
# measured). Twice that leaves room for other seeds, while a layer that silently ran in the
# wrong precision or was skipped is off by far more.
BF16_RTOL = 0.03
# float16 output of values near 1: a unit in the last place is 2^-10 ~ 1e-3.
# A bfloat16 output against float64 math on the same bfloat16 input: the output's own rounding,
# half a unit in the last place (2^-9 relative), plus as much again for the float32 statistics.
BF16_OUTPUT_RTOL = 2**-8
FLOAT16_ATOL = 2e-3

# A bf16 model inside float32 sampler math (tests/test_samplers.py) vs the all-float32 run:
# bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2% per cast), and the model input and
# output are cast at each of 8 steps; 2% relative bounds that accumulation.
BF16_MODEL_RTOL = 2e-2
