"""Inputs that may be local paths or Hugging Face Hub ids, and publishing a converted folder.

Every download goes through `huggingface_hub` (its cache, its progress bars, its authentication); the functions are
looked up on the module at call time so that tests can mock them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub

from .conversion_errors import ConversionError, _first_line

# "org/name", optionally followed by "/path/in/repo" and "@revision"
_HUB_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?P<path>(/[^@]+)?)(@(?P<revision>[\w.\-/]+))?$")


@dataclass(frozen=True)
class HubSpec:
    """A hub reference: repository, optional file inside it, optional revision."""

    repo_id: str
    filename: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        text = self.repo_id + (f"/{self.filename}" if self.filename else "")
        return text + (f"@{self.revision}" if self.revision else "")


def parse_hub_spec(spec: str) -> HubSpec | None:
    """`org/name[/file][@revision]` as a `HubSpec`, or None if `spec` is not of that form."""
    match = _HUB_SPEC.match(str(spec))
    if match is None:
        return None
    path = match.group("path").lstrip("/") or None
    return HubSpec(match.group("repo"), path, match.group("revision"))


def is_local(spec: str | os.PathLike) -> bool:
    """Whether `spec` names an existing local file or folder (local paths win over hub ids)."""
    return Path(spec).expanduser().exists()


def _hub_error(what: str, spec: object, error: Exception) -> ConversionError:
    # `runs/my-run/checkpoint.pt` with a typo reads as a hub id: say so when its first folder is a local one
    first = Path(str(spec)).expanduser().parts[0] if str(spec) else ""
    local_hint = (
        f" ({first}/ is a local folder: if {spec!s} was meant as a local path, it does not exist.)"
        if first and Path(first).expanduser().is_dir()
        else ""
    )
    return ConversionError(
        f"{what}: {spec!s} is no local path, and downloading it from the Hugging Face Hub failed "
        f"({type(error).__name__}: {_first_line(error)}). Pass a local path, check the repo id, or log in "
        f"(`hf auth login`) for gated repos.{local_hint}"
    )


def resolve_file(
    spec: str | os.PathLike, default_filename: str, what: str, cache_dir: str | os.PathLike | None = None
) -> Path:
    """A local file, or a file downloaded from the hub: `org/name` (then `default_filename`), `org/name/file`."""
    if is_local(spec):
        path = Path(spec).expanduser()
        if path.is_dir():
            path = path / default_filename
        if not path.is_file():
            raise FileNotFoundError(f"{what}: {path}: no such file.")
        return path
    hub = parse_hub_spec(str(spec))
    if hub is None:
        raise FileNotFoundError(f"{what}: {spec}: no such file, and not a hub id (org/name[/file][@revision]).")
    try:
        return Path(
            huggingface_hub.hf_hub_download(
                hub.repo_id, hub.filename or default_filename, revision=hub.revision, cache_dir=cache_dir
            )
        )
    except Exception as error:  # noqa: BLE001 - every hub failure is reported the same way
        raise _hub_error(what, spec, error) from error


def list_files(spec: str | os.PathLike, what: str) -> list[str]:
    """The files of a local folder (relative paths) or of a hub repo."""
    if is_local(spec):
        root = Path(spec).expanduser()
        if not root.is_dir():
            raise ConversionError(f"{what}: {root} is a file; a folder (or hub repo) is needed.")
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    hub = parse_hub_spec(str(spec))
    if hub is None or hub.filename:
        raise FileNotFoundError(f"{what}: {spec}: no such folder, and not a hub repo id (org/name[@revision]).")
    try:
        return sorted(huggingface_hub.list_repo_files(hub.repo_id, revision=hub.revision))
    except Exception as error:  # noqa: BLE001
        raise _hub_error(what, spec, error) from error


def resolve_folder(
    spec: str | os.PathLike,
    what: str,
    choose: Callable[[list[str]], Iterable[str]],
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local folder, or the files of a hub repo that `choose(all_files)` picks, downloaded into the hub cache."""
    if is_local(spec):
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise ConversionError(f"{what}: {path} is a file; a folder (or hub repo id) is needed.")
        return path
    files = list_files(spec, what)
    try:
        wanted = sorted(set(choose(files)))
    except ConversionError as error:
        raise ConversionError(f"{what}: {spec}: {error}") from error
    hub = parse_hub_spec(str(spec))
    try:
        return Path(
            huggingface_hub.snapshot_download(
                hub.repo_id, revision=hub.revision, allow_patterns=wanted, cache_dir=cache_dir
            )
        )
    except Exception as error:  # noqa: BLE001
        raise _hub_error(what, spec, error) from error


def push_problem(repo_id: str) -> str | None:
    """Why an upload to `repo_id` cannot work, found before anything is converted (None when none is seen): a repo id
    the hub refuses, the hub switched off (`HF_HUB_OFFLINE`), or no token to write with."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        return str(error)
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "the hub is switched off here (HF_HUB_OFFLINE is set): unset it, or convert without --push-to-hub."
    if huggingface_hub.get_token() is None:
        return "no hub token to upload with: log in (`hf auth login`) or set HF_TOKEN first."
    return None


# Removed from the hub repo by an upload unless the folder has them: the weights' files at the repo's top level, under
# the names transformers saves them (the folder's own are uploaded). huggingface_hub matches `delete_patterns` with
# fnmatch against the whole path, where `*` matches `/` too: `*.safetensors` would also delete an adapter, ONNX export
# or original checkpoint that the owner keeps in a subfolder.
STALE_ON_THE_HUB = [
    "model.safetensors",
    "model-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors",
    "model.safetensors.index.json",
]


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    commit_message: str = "Upload OpenFlamingo converted with openflamingo-hf",
    token: str | None = None,
) -> str:
    """Create `repo_id` (if needed) and upload `folder` to it in one commit; returns the commit URL. `private=None`
    creates the repo with the hub's default visibility (public, unless the organization's default is private);
    `private=True` refuses an existing public repo. Weight files at the repo's top level that the folder
    lacks (an earlier upload's shards or single file) are deleted in the same commit; subfolders are left alone."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder}: not a converted model folder (no config.json).")
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        # `private` is ignored for a repo that exists already: a public one is not uploaded to when private was asked
        if private and not api.repo_info(repo_id=repo_id, repo_type="model").private:
            raise ConversionError(
                f"The hub repo {repo_id} exists and is public, and --private does not change an existing repo: "
                f"nothing was uploaded, and {folder} stays as it is. Make the repo private on the hub first, or push "
                "without --private."
            )
        commit = api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(folder),
            commit_message=commit_message,
            # weights of an earlier upload that this folder does not have (another shard count or dtype): left in the
            # repo, an old `model.safetensors` is what transformers loads, ahead of the new shards' index
            delete_patterns=STALE_ON_THE_HUB,
        )
    except ConversionError:
        raise
    except Exception as error:  # noqa: BLE001
        status = getattr(getattr(error, "response", None), "status_code", None)
        hint = " Are you logged in (`hf auth login`) with a token that can write to it?" if status in (401, 403) else ""
        raise ConversionError(
            f"Uploading {folder} to the hub repo {repo_id} failed ({type(error).__name__}: {_first_line(error)})."
            f"{hint} The folder stays as it is: upload it later with "
            f"`hf upload {repo_id} {folder} .{' --private' if private else ''}`."
        ) from error
    return str(getattr(commit, "commit_url", commit))


__all__ = [
    "HubSpec",
    "is_local",
    "list_files",
    "parse_hub_spec",
    "push_folder_to_hub",
    "push_problem",
    "resolve_file",
    "resolve_folder",
]
