"""A denoising progress bar fed from inside the jitted scan by `jax.debug.callback`.

After every sampler step, each device that runs it calls `tick()` once; the bar divides by the
device count, so it advances once per step whatever the sharding.
"""

from __future__ import annotations

import contextlib
import threading

_lock = threading.Lock()
_state = {"bar": None, "ticks": 0, "devices": 1}


def tick() -> None:
    with _lock:
        bar = _state["bar"]
        if bar is None:
            return
        _state["ticks"] += 1
        done = _state["ticks"] // _state["devices"]
        if done > bar.n:
            bar.update(done - bar.n)


@contextlib.contextmanager
def bar(*, enabled: bool, devices: int, total: int, desc: str = "denoising"):
    if not enabled:
        yield
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="step", leave=False) as b:
        with _lock:
            _state.update(bar=b, ticks=0, devices=devices)
        try:
            yield
        finally:
            with _lock:
                _state["bar"] = None
