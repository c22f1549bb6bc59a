"""Hugging Face Hub model ids (``org/name``, ``org/name:Q4_K_M``) -> a local checkpoint.

The order is the one users of vLLM and llama.cpp expect: a local path wins (the caller
checks it first); then the hub cache (``--download-dir`` or ``HF_HUB_CACHE``) when it
already holds everything the model needs, with no network call at all; then a download
through ``huggingface_hub`` of only the files kvasir reads: config, tokenizer and
safetensors shards, or one ``*.gguf`` picked by ``--gguf-file`` or a ``:QUANT`` suffix.
Pickled weights (``*.bin``, ``*.pt``) are never fetched. ``HF_HUB_OFFLINE=1`` stops at
the cache with an error naming what is missing; ``HF_TOKEN`` and ``HF_ENDPOINT`` are
read when the call is made (not when ``huggingface_hub`` was imported), so a process
that sets them late is still honoured.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import os
import re
from typing import NamedTuple

logger = logging.getLogger(__name__)

# Everything a safetensors checkpoint needs besides its shards.
CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
SAFETENSORS_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# llama.cpp's pick when a GGUF repo is named without a quant tag.
DEFAULT_GGUF_QUANT = "Q4_K_M"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHARDED_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


class HubModelId(NamedTuple):
    repo_id: str
    quant: str | None  # the ``:Q4_K_M`` suffix, as llama.cpp users write it


def parse_hub_model_id(model: str) -> HubModelId | None:
    """``org/name[:QUANT]`` -> its parts; None for anything that is not a hub id
    (absolute or relative paths, ``~``, files with extensions such as ``.gguf``)."""
    if model.startswith((".", "/", "~")) or model.endswith((".gguf", ".json")):
        return None
    if _HUB_ID.match(model) is None or ".." in model:
        return None
    repo_id, _, quant = model.partition(":")
    return HubModelId(repo_id, quant or None)


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as huggingface_hub reads it,
    but at call time."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_cache_dir(download_dir: str | None) -> str:
    if download_dir:
        return os.path.expanduser(download_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    base = name.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(base, p) for p in patterns)


def select_gguf(files: list[str], repo_id: str, quant: str | None, gguf_file: str | None) -> str:
    """The one ``*.gguf`` of ``files`` that ``gguf_file`` (a file name in the repo) or
    ``quant`` (``Q4_K_M``, matched case-insensitively as a ``-``/``.``/``_``-delimited
    part of the name) names; without either, the only GGUF or the default quant.
    Raises ValueError listing what the repo has."""
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if gguf_file is not None:
        if gguf_file in files:
            return gguf_file
        raise ValueError(
            f"gguf_file {gguf_file!r} is not in hub repo '{repo_id}' (its GGUF files: {ggufs})"
        )
    if not ggufs:
        raise ValueError(f"hub repo '{repo_id}' has no .gguf files (quant {quant!r} requested)")
    if quant is None and len(ggufs) == 1:
        return ggufs[0]
    want = (quant or DEFAULT_GGUF_QUANT).lower()
    pattern = re.compile(rf"(^|[-._/]){re.escape(want)}([-._]|$)")
    hits = [f for f in ggufs if pattern.search(f.lower().removesuffix(".gguf"))]
    if len(hits) == 1:
        name = hits[0]
        if _SHARDED_GGUF.search(name):
            raise ValueError(f"'{repo_id}/{name}' is a split GGUF; kvasir reads one-file GGUFs")
        return name
    what = f"quant {quant!r}" if quant else f"no quant tag (default {DEFAULT_GGUF_QUANT})"
    raise ValueError(
        f"hub repo '{repo_id}' with {what}: {len(hits)} matching GGUF files "
        f"({hits or ggufs}); name one with --gguf-file or a ':QUANT' suffix"
    )


class _Plan(NamedTuple):
    kind: str  # "safetensors" | "gguf"
    files: list[str]  # repo files to have locally


def plan_files(files: list[str], repo_id: str, quant: str | None, gguf_file: str | None) -> _Plan:
    """Which of a repo's ``files`` kvasir needs. Safetensors checkpoints (config.json +
    shards) win unless a GGUF was asked for; a repo with only pickled weights is refused."""
    has_safetensors = "config.json" in files and any(_matches(f, ("*.safetensors",)) for f in files)
    if quant is not None or gguf_file is not None or not has_safetensors:
        if any(f.endswith(".gguf") for f in files) or gguf_file is not None:
            return _Plan("gguf", [select_gguf(files, repo_id, quant, gguf_file)])
    if has_safetensors:
        wanted = [f for f in files if f in CONFIG_FILES or _matches(f, SAFETENSORS_PATTERNS)]
        return _Plan("safetensors", sorted(wanted))
    if any(_matches(f, PICKLE_PATTERNS) for f in files):
        raise ValueError(
            f"hub repo '{repo_id}' has only pickled weights (*.bin/*.pt); kvasir never "
            "loads pickles: use a repo with safetensors or GGUF files"
        )
    raise ValueError(
        f"hub repo '{repo_id}' has neither config.json + *.safetensors nor a .gguf file "
        f"(files: {sorted(files)[:20]})"
    )


def _complete(folder: str, plan: _Plan) -> bool:
    """All planned files are in ``folder``, and every shard an index names."""
    for f in plan.files:
        if not os.path.isfile(os.path.join(folder, f)):
            return False
        if f.endswith(".safetensors.index.json"):
            with open(os.path.join(folder, f)) as fh:
                shards = set(json.load(fh).get("weight_map", {}).values())
            if not all(os.path.isfile(os.path.join(folder, s)) for s in shards):
                return False
    return True


def _local_files(folder: str) -> list[str]:
    out = []
    for root, _dirs, names in os.walk(folder):
        for n in names:
            out.append(os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/"))
    return out


def _result(folder: str, plan: _Plan) -> str:
    return os.path.join(folder, plan.files[0]) if plan.kind == "gguf" else folder


def _cached_snapshot(
    repo_id: str, revision: str | None, cache_dir: str, quant: str | None, gguf_file: str | None
) -> str | None:
    """The local checkpoint path from the hub cache, or None if it is not complete there.
    Reads the cache layout huggingface_hub documents (``models--org--name/refs/<rev>``
    -> ``snapshots/<sha>/``) without a network call."""
    storage = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    rev = revision or "main"
    sha = rev if _COMMIT.fullmatch(rev) else None
    if sha is None:
        try:
            with open(os.path.join(storage, "refs", rev)) as f:
                sha = f.read().strip()
        except OSError:
            return None
    folder = os.path.join(storage, "snapshots", sha)
    if not os.path.isdir(folder):
        return None
    try:
        plan = plan_files(_local_files(folder), repo_id, quant, gguf_file)
    except ValueError:
        return None
    return _result(folder, plan) if _complete(folder, plan) else None


@functools.lru_cache(maxsize=32)
def resolve_hub_model(
    model: str,
    revision: str | None = None,
    download_dir: str | None = None,
    gguf_file: str | None = None,
) -> str:
    """The local path (an HF directory, or a ``.gguf`` file) of hub model id ``model``
    at ``revision`` (a branch, tag or commit; default main): from the hub cache if it
    holds the needed files, else downloaded into it with a progress bar. Raises
    ValueError with the reason (offline and not cached, unknown repo or revision, no
    access without ``HF_TOKEN``, no usable weights). Cached per process."""
    parsed = parse_hub_model_id(model)
    if parsed is None:
        raise ValueError(f"{model!r} is not a hub model id (org/name[:QUANT])")
    repo_id, quant = parsed
    cache_dir = hub_cache_dir(download_dir)
    cached = _cached_snapshot(repo_id, revision, cache_dir, quant, gguf_file)
    if cached is not None:
        logger.info("model %s: from the hub cache, %s", model, cached)
        return cached
    rev = revision or "main"
    if hub_offline():
        raise ValueError(
            f"model '{model}' (revision {rev}) is not a local path and not fully in the hub "
            f"cache at {cache_dir}, and HF_HUB_OFFLINE is set: download it first (unset "
            "HF_HUB_OFFLINE) or pass a local directory / .gguf file"
        )
    return _download(model, repo_id, quant, rev, cache_dir, gguf_file)


def _download(
    model: str, repo_id: str, quant: str | None, rev: str, cache_dir: str, gguf_file: str | None
) -> str:
    import httpx2
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = os.environ.get("HF_ENDPOINT") or None
    token = os.environ.get("HF_TOKEN") or None
    where = endpoint or "the Hugging Face Hub"
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(repo_id, revision=rev)
        files = [s.rfilename for s in info.siblings or []]
        plan = plan_files(files, repo_id, quant, gguf_file)
        logger.info("model %s: downloading %d files from %s", model, len(plan.files), where)
        folder = snapshot_download(
            repo_id,
            revision=rev,  # (not info.sha: the branch's ref is written into the cache)
            cache_dir=cache_dir,
            allow_patterns=plan.files,
            endpoint=endpoint,
            token=token,
        )
    except GatedRepoError as e:
        raise ValueError(
            f"hub repo '{repo_id}' is gated: accept its terms and set HF_TOKEN ({e})"
        ) from None
    except RevisionNotFoundError:
        raise ValueError(f"hub repo '{repo_id}' has no revision {rev!r} (--revision)") from None
    except RepositoryNotFoundError:
        hint = "" if token else "; for a private repo set HF_TOKEN"
        raise ValueError(
            f"model '{model}' is neither a local path nor a repo on {where}{hint}"
        ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise ValueError(
                f"{where} refused access to '{repo_id}' (401): check HF_TOKEN"
            ) from None
        raise ValueError(f"downloading '{model}' from {where} failed: {e}") from None
    except (httpx2.HTTPError, LocalEntryNotFoundError, OSError) as e:
        raise ValueError(
            f"cannot reach {where} to download '{model}' and it is not in the hub cache at "
            f"{cache_dir} ({type(e).__name__}: {e})"
        ) from None
    if not _complete(folder, plan):
        raise ValueError(f"download of '{model}' into {folder} is incomplete: {plan.files}")
    return _result(folder, plan)
