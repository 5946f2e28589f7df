"""Training checkpoints: a small wrapper around orbax's CheckpointManager.

A checkpoint of step k holds three items: `state` (a pytree of arrays: parameters, EMA
parameters, optimizer state, step), `data` (the data stream's position, as JSON) and `config`
(the run's config, as JSON). Orbax writes each checkpoint into a temporary folder and renames it
when complete, so a process killed at any moment (during a save too) leaves the previous
checkpoints intact; the leftovers of an unfinished save are removed on the next start.

`save` refuses a state with a non-finite floating-point array: no checkpoint with NaN or
infinite weights is ever written. Restores go into an abstract target (`jax.ShapeDtypeStruct`s
with shardings), so every array comes back directly onto its devices, in the memory order the
target asks for.

Importing pretrained weights is `jaxdiff.convert`, not this module.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxdiff.sharding import relayout
from jaxdiff.train.state import all_finite as finite


class NonFiniteError(RuntimeError):
    """A loss or a weight is NaN or infinite; the run stops and writes no checkpoint of it."""


@jax.jit
def _all_finite(tree) -> jax.Array:
    # The train step's check (its `params_finite`): every leaf in one final reduction.
    return finite(
        [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    )


def all_finite(tree) -> bool:
    """Whether every floating-point array of `tree` is finite."""
    return bool(_all_finite(tree))


class CheckpointError(ValueError):
    """A checkpoint that is there but cannot be restored (damaged files, or a state of other
    shapes than the run's): one line naming it and orbax's reason."""


def _is_read_echo(error: BaseException | None) -> bool:
    """An echo of a checkpoint read that failed already (see `Checkpointer._read`)."""
    text = str(error)
    return (isinstance(error, RuntimeError) and text == "Event loop is closed") or text.startswith(
        "Encountered error while reading array index"
    )


def _dropping_read_echoes(previous):
    """An unraisable-exception hook that drops what `_is_read_echo` names and hands the rest to
    `previous`."""

    def hook(unraisable):
        if not _is_read_echo(unraisable.exc_value):
            previous(unraisable)

    return hook


class Checkpointer:
    """Saves and restores (state, data position, config) by step in `directory`."""

    def __init__(self, directory, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,  # the caller decides when
            create=True,
            cleanup_tmp_directories=True,  # the remains of a save cut short by a kill
            enable_async_checkpointing=async_save,
        )
        # Handlers named up front: a new process reads a checkpoint's metadata before it restores.
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, *, data: dict, config: dict) -> None:
        """Writes checkpoint `step` (in the background when async); refuses non-finite state."""
        if not all_finite(state):
            raise NonFiniteError(
                f"step {step}: the weights hold NaN or infinite values; no checkpoint written"
            )
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def restore(self, step: int | None, abstract_state) -> tuple[Any, dict, dict]:
        """(state, data, config) of checkpoint `step` (default: the latest).

        abstract_state: the state's tree of `jax.ShapeDtypeStruct`s with shardings, or with
        `Format`s (`jaxdiff.sharding.placements`): orbax restores the default memory order, and
        an array placed in another moves into it (`jaxdiff.sharding.relayout`).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        restored = self._read(step, lambda: self._manager.restore(step, args=args))
        state = relayout(restored.state, abstract_state)
        return state, dict(restored.data), dict(restored.config)

    def state_metadata(self, step: int):
        """The tree of checkpoint `step`'s state, each array's orbax metadata (shape, dtype) in
        place of the array: what it holds, read without the arrays."""
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}")
        return self._read(step, lambda: self._manager.item_metadata(step)["state"].tree)

    def read_config(self, step: int | None = None) -> dict:
        """The config saved with checkpoint `step` (default: the latest), without the arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        args = ocp.args.Composite(config=ocp.args.JsonRestore())
        restored = self._read(step, lambda: self._manager.restore(step, args=args))
        return dict(restored.config)

    def _read(self, step: int, read: Callable[[], Any]) -> Any:
        """`read()` of checkpoint `step`; orbax's failure as one CheckpointError that names the
        checkpoint before it (moved aside, a damaged checkpoint leaves that one the latest)."""
        # Reads still in flight when one fails report to orbax's closed event loop from
        # tensorstore's threads, as unraisable exceptions, during the failure and after it:
        # dropped while reading, and after a failure for good (the error below names it).
        previous = sys.unraisablehook
        sys.unraisablehook = _dropping_read_echoes(previous)
        try:
            value = read()
        except Exception as e:
            cause = e  # orbax wraps tensorstore's error, which names the file
            while cause.__cause__ is not None:
                cause = cause.__cause__
            reason = next((ln for ln in str(cause).splitlines() if ln.strip()), "")
            earlier = [s for s in self.all_steps() if s < step]
            hint = f"; the checkpoint before it is step {max(earlier)}" if earlier else ""
            if "stored shape" in reason:  # not damaged: a state of another shape asked for
                hint = "; its arrays have other shapes than this run's (another model config?)"
            error = CheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be restored "
                f"({type(cause).__name__}: {reason.strip()[:300]}){hint}"
            )
        else:
            sys.unraisablehook = previous
            return value
        # orbax read the arrays in concurrent tasks; those that failed after the first would each
        # be logged in full ("Task exception was never retrieved", hundreds of lines) when
        # collected. Collected here, with the failure above standing for them all.
        quiet = logging.getLogger("asyncio")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            gc.collect()
        finally:
            quiet.setLevel(level)
        raise error

    def wait(self) -> None:
        """Blocks until a background save is complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def host_copy(tree):
    """Arrays -> numpy on the host (fully replicated or single-process arrays)."""
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
