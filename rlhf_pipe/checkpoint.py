"""Checkpoints that a run can resume from exactly, written atomically.

Layout of `<work_dir>/checkpoints/step_NNNNNN/`:
    actor/, critic/        plain HF folders (weights, config, tokenizer)
    trainer_state.pt       optimizer state by parameter name (rlhf_pipe/optim_state.py: loads
                           into any layout) and scheduler state, data position, RNG states,
                           running reward statistics, step, policy version
    COMPLETE               written last; a folder without it is never resumed from

Each checkpoint is built in a `.tmp` sibling and renamed into place, so a kill mid-write leaves
the previous checkpoint whole. A full disk removes the partial folder and reports it.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    pass


def checkpoint_root(work_dir: str | Path) -> Path:
    return Path(work_dir) / CHECKPOINT_DIR


def complete_checkpoints(work_dir: str | Path) -> list[Path]:
    root = checkpoint_root(work_dir)
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith("step_")
        and not p.name.endswith(".tmp")
        and (p / MARKER).exists()
    )


def resolve_resume(spec: str, work_dir: str | Path) -> Path | None:
    """'auto' -> the newest complete checkpoint under work_dir (None if there is none);
    a path -> that checkpoint, which must be complete."""
    if spec == "auto":
        found = complete_checkpoints(work_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / MARKER).exists():
        raise CheckpointError(
            f"--resume {spec}: not a complete checkpoint (no {MARKER} file in {path})"
        )
    return path


def write_checkpoint(work_dir: str | Path, step: int, write_fn, keep_last: int = 0) -> Path:
    """Call `write_fn(tmp_dir)` to fill a temp folder, then publish it as step_NNNNNN."""
    root = checkpoint_root(work_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_fn(tmp)
        (tmp / MARKER).write_text(f"{step}\n")
        _fsync_tree(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(work_dir)
        kept = f"; kept {previous[-1]}" if previous else ""
        if e.errno == errno.ENOSPC:
            raise CheckpointError(f"checkpoint {final}: no space left on device{kept}") from None
        raise CheckpointError(f"checkpoint {final}: {e.strerror or e}{kept}") from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last:
        for old in complete_checkpoints(work_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_tree(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, part: str = "actor") -> Path:
    """Copy one model of a complete checkpoint out as a plain HF folder (weights, config,
    tokenizer), e.g. to serve it or to start another run from it."""
    src = Path(checkpoint)
    if not (src / MARKER).exists():
        raise CheckpointError(f"{src}: not a complete checkpoint (no {MARKER} file)")
    if not (src / part).is_dir():
        raise CheckpointError(f"{src}: has no {part!r} model")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src / part, tmp)
    os.replace(tmp, out)  # renaming over an empty folder is allowed
    return out
