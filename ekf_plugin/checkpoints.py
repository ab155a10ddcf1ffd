"""Crash-safe checkpoint files for Lightning/``spktrain`` (``trainer.plugins``, see the experiment configs).

Lightning's own writer stages a checkpoint in the system temporary directory and moves it; with that
directory on another filesystem the move is a copy, and a ``kill -9`` during it leaves a truncated
``last.ckpt`` (0 bytes measured) and an orphan. :func:`atomic_save` instead

1. writes ``.<name>.<pid>.tmp`` beside the target and ``fsync``\\ s it,
2. keeps the previous complete file as ``<name>.prev`` (a hard link, so the target never disappears),
3. ``os.replace``\\ s the new file onto the target and ``fsync``\\ s the directory.

:class:`AtomicCheckpointIO` uses it for every checkpoint a Trainer writes, and when a checkpoint cannot
be read (truncated, empty) it loads ``<name>.prev`` with a message saying so.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

log = logging.getLogger(__name__)

PREVIOUS_SUFFIX = ".prev"


class CheckpointUnreadableError(RuntimeError):
    """A checkpoint cannot be read and no previous complete one exists: the run cannot resume."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:120]}" if lines else type(exc).__name__


def previous_path(path: Union[str, Path]) -> Path:
    """Where :func:`atomic_save` keeps the previous complete version of ``path``."""
    path = Path(path)
    return path.with_name(path.name + PREVIOUS_SUFFIX)


def atomic_save(obj: Any, path: Union[str, Path], save: Optional[Callable[[Any, Any], None]] = None) -> Path:
    """``torch.save(obj, path)`` that never leaves a partial ``path`` and keeps the previous one.

    Args:
        obj: anything ``save`` accepts.
        path: target file; its folder is created.
        save: ``save(obj, file_object)`` (default ``torch.save``).
    """
    import torch

    save = save or torch.save
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if path.exists():
            prev = previous_path(path)
            link = path.with_name(f".{path.name}.{os.getpid()}.prevtmp")
            link.unlink(missing_ok=True)
            try:
                os.link(path, link)
            except OSError:  # no hard links here: a copy, still beside the target
                import shutil

                shutil.copy2(path, link)
            os.replace(link, prev)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def _make_io_class() -> type:
    from pytorch_lightning.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """``TorchCheckpointIO`` whose writes go through :func:`atomic_save` and whose reads fall back to
        the previous complete checkpoint (``<name>.prev``) when the file is truncated or empty."""

        def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
            if storage_options is not None:
                raise TypeError("AtomicCheckpointIO does not take storage_options")
            atomic_save(checkpoint, path)

        def load_checkpoint(self, path: Any, map_location: Optional[Callable] = lambda storage, loc: storage,
                            weights_only: Optional[bool] = None) -> Dict[str, Any]:
            try:
                return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
            except Exception as exc:
                prev = previous_path(path)
                if "Unsupported global" in str(exc):
                    raise
                if not prev.exists():
                    raise CheckpointUnreadableError(
                        f"checkpoint {path} cannot be read ({_describe(exc)}) "
                        f"and there is no previous one ({prev.name}): this run cannot resume; delete {path} to "
                        "start from scratch"
                    ) from exc
                message = (f"checkpoint {path} cannot be read ({_describe(exc)}); "
                           f"falling back to the previous complete checkpoint {prev}")
                log.warning(message)
                print(f"[ekf-plugin] {message}", file=sys.stderr, flush=True)
                return super().load_checkpoint(prev, map_location=map_location, weights_only=weights_only)

        def remove_checkpoint(self, path: Any) -> None:
            super().remove_checkpoint(path)
            previous_path(path).unlink(missing_ok=True)

    AtomicCheckpointIO.__module__ = __name__
    return AtomicCheckpointIO


def __getattr__(name: str) -> Any:
    """``AtomicCheckpointIO`` is built on first use, so importing this module imports no Lightning."""
    if name == "AtomicCheckpointIO":
        cls = _make_io_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
