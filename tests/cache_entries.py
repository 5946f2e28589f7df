"""Reading JAX's persistent compilation cache folder in tests.

An entry's file name is `<program>-<key>-cache`. jaxdiff caches every program that took at least
0.1 s to compile (`jaxdiff.compilation_cache.enable`), so a small eager op (a `fold_in` outside a
jitted function, say) that compiled in 0.09 s in one process and 0.11 s in the next, on a busy
machine, adds an entry without anything being compiled twice. What a test can assert is that no
program the first process cached was compiled again: a second entry under a cached program's
name means a new key, hence a new compilation.
"""

from pathlib import Path


def entries(folder: Path) -> list[str]:
    """The entry file names in a cache folder (empty if the folder does not exist)."""
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def programs(names) -> set[str]:
    """The program names of cache entries (`jit_train_step`, ...)."""
    return {name.split("-")[0] for name in names}


def recompiled(before, after) -> set[str]:
    """The entries added since `before` whose program `before` already cached."""
    return {n for n in set(after) - set(before) if n.split("-")[0] in programs(before)}
