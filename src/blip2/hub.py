"""Where a model comes from: a local folder or file, or a Hugging Face hub id.

Hub ids go through `huggingface_hub.snapshot_download`, so its cache, revisions and offline mode
(`HF_HUB_OFFLINE=1`, or `local_files_only=True`) apply. Only what loading needs is downloaded: configs,
tokenizer and processor files and the safetensors weights (the legacy `.bin` shards only when a repo has
no safetensors).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from blip2.errors import UserError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILES = ["*.json", "*.txt", "*.model", "*.safetensors", "tokenizer*", "merges.txt", "vocab*"]


def looks_like_hub_id(name: str) -> bool:
    """`owner/name` as the hub spells repository ids: no path syntax (`./x`, `../x`, `/x`, `x/y/z`, `~`,
    a backslash) and none of the sequences the hub refuses (`..`, `--`)."""
    refused = name.startswith((".", "~")) or ".." in name or "--" in name
    return bool(_HUB_ID.match(name)) and not refused


def resolve(
    name_or_path: str | os.PathLike[str],
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """A local path for `name_or_path`: an existing file or folder as is, a hub id downloaded or cached.

    Args:
        name_or_path: a folder, a checkpoint file or a hub id such as `Salesforce/blip2-opt-2.7b`.
        revision: hub branch, tag or commit.
        cache_dir: hub cache folder (default: huggingface_hub's).
        local_files_only: never reach the network (default: huggingface_hub's `HF_HUB_OFFLINE`).

    Raises:
        UserError: the path does not exist, or the hub id can be neither found in the cache nor
            downloaded. One sentence that says what to do.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        return path
    if not looks_like_hub_id(name):  # path syntax: a path that is missing
        raise UserError(f"{name} does not exist: pass an existing folder or checkpoint file, or a hub id")
    # `owner/name` is a hub id even beside a local `owner/` folder (`Salesforce/blip2-opt-2.7b` must
    # reach the hub wherever one runs); when the hub does not have it either and the folder exists
    # (`runs/final` beside `runs/`), the error says first that the path is missing
    parent = Path(name).parent
    missing = (
        f"{name} does not exist ({parent}/ holds no {Path(name).name}), nor is it"
        if parent.is_dir()
        else None
    )
    return _download(name, revision, cache_dir, local_files_only, missing)


def _download(
    repo_id: str,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool | None,
    missing: str | None = None,
) -> Path:
    """`repo_id` from the hub (or its cache); `missing` begins the errors when `repo_id` could also be
    a local path that is missing."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    offline = constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only
    kwargs = dict(repo_id=repo_id, revision=revision, cache_dir=cache_dir, local_files_only=offline)
    nor = missing or f"{repo_id} is neither an existing path nor"
    try:
        path = Path(huggingface_hub.snapshot_download(allow_patterns=_FILES, **kwargs))
        if not any(path.glob("*.safetensors")):  # an old repo with .bin weights only
            path = Path(huggingface_hub.snapshot_download(allow_patterns=[*_FILES, "*.bin"], **kwargs))
        return path
    except errors.HFValidationError:
        raise UserError(f"{nor} a valid hub id") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError):
        raise UserError(
            f"{nor} a hub repository you can read: check the name, or log in if it is gated"
        ) from None
    except errors.RevisionNotFoundError:
        raise UserError(f"{repo_id} has no revision {revision!r}: check the branch, tag or commit") from None
    except errors.LocalEntryNotFoundError:
        where = "offline mode is on" if offline else "the hub cannot be reached"
        if missing:
            raise UserError(
                f"{missing} in the local Hugging Face cache ({where}): check the path, or download the "
                "model once while online"
            ) from None
        raise UserError(
            f"{repo_id} is not in the local Hugging Face cache and {where} (nor is it an existing path): "
            "download it once while online, or pass a local folder"
        ) from None
    except (OSError, errors.HfHubHTTPError) as e:
        raise UserError(
            f"could not download {repo_id} ({type(e).__name__}): check the network, or pass a local folder"
        ) from None
