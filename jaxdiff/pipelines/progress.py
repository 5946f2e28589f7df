"""The denoising progress bar: a host loop runs the sampler one step per call
(`StableDiffusion._run_with_progress`) and advances it after each finished step.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def bar(*, total: int, desc: str = "denoising"):
    """Yields `advance()`, which counts one finished step."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="step", leave=False) as b:
        yield lambda: b.update(1)
