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
    """`owner/name` with no path syntax (`./x`, `/x`, `x/y/z`, `~`)."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "~"))


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
    if not looks_like_hub_id(name) or Path(name).parent.is_dir():
        # `runs/final` beside an existing `runs/` folder is a path that is missing, not a hub id
        raise UserError(f"{name} does not exist: pass an existing folder or checkpoint file, or a hub id")
    return _download(name, revision, cache_dir, local_files_only)


def _download(
    repo_id: str,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool | None,
) -> Path:
    import huggingface_hub
    from huggingface_hub import constants, errors

    offline = constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only
    kwargs = dict(repo_id=repo_id, revision=revision, cache_dir=cache_dir, local_files_only=offline)
    try:
        path = Path(huggingface_hub.snapshot_download(allow_patterns=_FILES, **kwargs))
        if not any(path.glob("*.safetensors")):  # an old repo with .bin weights only
            path = Path(huggingface_hub.snapshot_download(allow_patterns=[*_FILES, "*.bin"], **kwargs))
        return path
    except errors.HFValidationError:
        raise UserError(f"{repo_id} is neither an existing path nor a valid hub id") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError):
        raise UserError(
            f"{repo_id} is neither an existing path nor a hub repository you can read: check the name, "
            "or log in if it is gated"
        ) from None
    except errors.RevisionNotFoundError:
        raise UserError(f"{repo_id} has no revision {revision!r}: check the branch, tag or commit") from None
    except errors.LocalEntryNotFoundError:
        where = "offline mode is on" if offline else "the hub cannot be reached"
        raise UserError(
            f"{repo_id} is not in the local Hugging Face cache and {where} (nor is it an existing path): "
            "download it once while online, or pass a local folder"
        ) from None
    except (OSError, errors.HfHubHTTPError) as e:
        raise UserError(
            f"could not download {repo_id} ({type(e).__name__}): check the network, or pass a local folder"
        ) from None
