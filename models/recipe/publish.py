"""Writing finetune.py's models into a model repository that a server may be serving from: which version
to write, and moving the built models in so that a rescan never sees a model.toml whose sha256 is not
the file it names.
"""

import os
from pathlib import Path

from photos import InputError

from appliance.engine.repository import Repository
from appliance.errors import ApplianceError


def _versions(folder: Path) -> list[int]:
    """The numbered folders holding a model.onnx, as the engine would count them (and `007` as 7)."""
    if not folder.is_dir():
        return []
    return [
        int(child.name)
        for child in folder.iterdir()
        if child.name.isascii() and child.name.isdigit() and (child / "model.onnx").is_file()
    ]


def version_to_write(out: Path, names: tuple[str, ...], asked: int | None) -> int:
    """--version, or one above the highest version of any of `names` in `out`.

    Writing at or below a version already there is refused. The engine serves the highest version, so a
    lower one would be written under a model.toml whose sha256 names a file that is not served, and neither
    model would load. Rewriting the served version in place cannot be one step: its model.onnx and the
    model.toml that names its digest are two files, and a server may rescan between them."""
    for name in names:
        if (out / name / "model.onnx").is_file():
            raise InputError(
                f"{out / name / 'model.onnx'} has no version folder; move it to "
                f"{out / name / '1' / 'model.onnx'} (the engine serves it as version 1) and run again"
            )
    held = {name: max(_versions(out / name), default=0) for name in names}
    holder = max(names, key=held.get)
    if asked is None:
        return held[holder] + 1
    if asked > held[holder]:
        return asked
    raise InputError(
        f"{out / holder} already holds version {held[holder]} (the engine serves the highest, and a version "
        f"is not rewritten in place): pass --version {held[holder] + 1}, or leave --version out"
    )


def publish(staging: Path, out: Path, names: tuple[str, ...], version: int) -> None:
    """Move the models built in `staging` (a folder in `out`, so each move is one rename) into `out`, in an
    order that leaves every model folder whole for a server rescanning it at any moment, its model.toml's
    sha256 always naming the file served: pin the version each existing model.toml serves now, move in the
    new version folders and the checkpoint, then replace each model.toml. A model new to `out` moves in
    whole. Stopped between two steps, the repository serves the old models, or some already the new."""
    existing = [name for name in names if (out / name).exists()]
    for name in existing:
        _pin_served_version(out / name, staging)
    for name in names:
        if name in existing:
            os.rename(staging / name / str(version), out / name / str(version))
        else:
            os.rename(staging / name, out / name)
    for name in existing:
        for file in ("checkpoint.pt", "model.toml"):
            if (staging / name / file).exists():
                os.replace(staging / name / file, out / name / file)


def _pin_served_version(folder: Path, scratch: Path) -> None:
    """Name in `folder`'s model.toml the version the engine serves from it now, if it names none, so that
    the higher version folder moved in beside it is not served under the old sha256."""
    manifest = folder / "model.toml"
    try:
        served = Repository(folder.parent).source(folder.name)
    except ApplianceError:  # no model there, or not loadable as it is: there is nothing to keep serving
        return
    if served.manifest.version is not None or not manifest.is_file():
        return
    pinned = scratch / f"{folder.name}.model.toml"
    pinned.write_bytes(f"version = {served.version}\n".encode() + manifest.read_bytes())
    os.replace(pinned, manifest)
