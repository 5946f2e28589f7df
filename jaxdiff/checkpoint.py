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
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        state = relayout(restored.state, abstract_state)
        return state, dict(restored.data), dict(restored.config)

    def state_metadata(self, step: int):
        """The tree of checkpoint `step`'s state, each array's orbax metadata (shape, dtype) in
        place of the array: what it holds, read without the arrays."""
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}")
        return self._manager.item_metadata(step)["state"].tree

    def read_config(self, step: int | None = None) -> dict:
        """The config saved with checkpoint `step` (default: the latest), without the arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return dict(restored.config)

    def wait(self) -> None:
        """Blocks until a background save is complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def host_copy(tree):
    """Arrays -> numpy on the host (fully replicated or single-process arrays)."""
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
