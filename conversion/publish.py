"""Validate a converted Engram repository folder and upload it to the Hugging Face Hub."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from .source import source_shards

logger = logging.getLogger(__name__)
REQUIRED_TAGS = ("engram", "custom_code")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
IGNORE_PATTERNS = ["*.tmp*", ".cache/*", "__pycache__/*", "*.pyc"]
# pickle-based weight or state files: code runs when they are loaded
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
EXECUTABLE_SUFFIXES = {".py", ".sh", ".so", ".exe", ".dll", ".dylib"}
_REMOTE_CODE_CHECK = """
import sys
sys.modules["engram_hf"] = None  # as a Hub user without engram-hf: only the folder's own code
from transformers import AutoConfig
from transformers.dynamic_module_utils import get_class_from_dynamic_module
folder, auto_map = sys.argv[1], sys.argv[2:]
AutoConfig.from_pretrained(folder, trust_remote_code=True)
for reference in auto_map:
    get_class_from_dynamic_module(reference, folder)
"""


def _check_remote_code(folder: Path, auto_map: dict) -> None:
    """Import every `auto_map` class from the folder's own files in a fresh process, engram_hf out of the way."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as modules:
        env = {**os.environ, "HF_MODULES_CACHE": modules, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-c", _REMOTE_CODE_CHECK, str(folder), *auto_map.values()],
                              capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode:
        error = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}"
        raise ValueError(f"The remote code in {folder} does not load as a Hub user would load it: {error}")


def _check_safetensors(path: Path) -> None:
    """The header parses and the file holds every byte it announces (a truncated upload is caught here)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length <= size - 8:
                raise ValueError("bad header length")
            header = json.loads(handle.read(length))
    except (ValueError, OSError) as error:
        raise ValueError(f"{path.name} is not a valid safetensors file: {error}") from error
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        raise ValueError(f"{path.name} is truncated or padded: its header announces {8 + length + end:,} bytes, "
                         f"the file has {size:,}.")


def validate_folder(folder: str | Path, allow_extra: bool = False) -> list[str]:
    """Check that `folder` is a complete Engram model repository; return its files (relative, sorted).

    Raises `ValueError` naming the first problem: config not loadable or without Engram fields/auto_map, remote-code
    files missing or not importable (checked with the folder's own code, as a Hub user loads it), a shard named in
    `model.safetensors.index.json` missing, a truncated safetensors file, no tokenizer, invalid card metadata, or
    (unless `allow_extra`) pickle-format files or executable files that are not the remote code.
    """
    from huggingface_hub import ModelCard
    from transformers import AutoConfig

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No such model folder: {folder}")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json.")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except ValueError as error:
        raise ValueError(f"{folder}/config.json is not valid JSON: {error}") from error
    auto_map = raw.get("auto_map") or {}
    for key in ("AutoConfig", "AutoModelForCausalLM"):
        if key not in auto_map:
            raise ValueError(f"config.json has no auto_map[{key!r}]: not a remote-code Engram checkpoint.")
    for target in auto_map.values():
        module = target.split("--")[-1].rsplit(".", 1)[0]
        if not (folder / f"{module}.py").is_file():
            raise ValueError(f"Remote-code file {module}.py named in auto_map is missing from {folder}.")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    except Exception as error:
        raise ValueError(f"config.json in {folder} does not load: {error}") from error
    if not getattr(config, "engram_layer_ids", None):
        raise ValueError(f"config.json in {folder} has no engram_* fields.")

    source_shards(folder)  # the index parses and names only shards that exist (or a model.safetensors is there)
    if not (folder / "tokenizer_config.json").is_file():
        raise ValueError(f"{folder} has no tokenizer (tokenizer_config.json).")

    readme = folder / "README.md"
    if not readme.is_file():
        raise ValueError(f"{folder} has no README.md model card.")
    try:
        data = ModelCard.load(readme).data.to_dict()
    except Exception as error:
        raise ValueError(f"README.md metadata is not valid YAML front matter: {error}") from error
    if data.get("library_name") != "transformers":
        raise ValueError("Model card metadata must set library_name: transformers.")
    if data.get("pipeline_tag") != "text-generation":
        raise ValueError("Model card metadata must set pipeline_tag: text-generation.")
    missing_tags = [t for t in REQUIRED_TAGS if t not in (data.get("tags") or [])]
    if missing_tags:
        raise ValueError(f"Model card metadata lacks the tags {missing_tags}.")
    base_models = data.get("base_model")
    for base in [base_models] if isinstance(base_models, str) else base_models or []:
        if not _REPO_ID.match(str(base)):
            raise ValueError(f"Model card base_model {base!r} is not a Hub model id (org/name).")
    relation = data.get("base_model_relation")
    if relation is not None and relation not in _RELATIONS:
        raise ValueError(f"Model card base_model_relation {relation!r} must be one of {sorted(_RELATIONS)}.")
    if relation is not None and not base_models:
        raise ValueError("Model card sets base_model_relation without base_model.")

    import fnmatch

    from ..modeling import configuration_engram

    remote_code = {p.name for p in Path(configuration_engram.__file__).parent.glob("*.py")} - {"__init__.py"}
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not any(fnmatch.fnmatch(rel, pattern) for pattern in IGNORE_PATTERNS):
            files.append(rel)
    for rel in files:
        suffix = Path(rel).suffix.lower()
        if suffix == ".safetensors":
            _check_safetensors(folder / rel)
        elif not allow_extra and suffix in PICKLE_SUFFIXES:
            raise ValueError(f"{rel} is a pickle-format file (loading it runs code); remove it, or pass "
                             "--allow-extra to upload it anyway.")
        elif not allow_extra and suffix in EXECUTABLE_SUFFIXES and rel not in remote_code:
            raise ValueError(f"{rel} is not part of the Engram remote code; remove it, or pass --allow-extra.")
    _check_remote_code(folder.resolve(), auto_map)  # last: the slowest check (a fresh process)
    return files


def publish(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    allow_extra: bool = False,
):
    """Validate `folder` and upload it to `repo_id` (created if needed).

    Returns the list of files for a dry run, otherwise the `CommitInfo` of the upload. A failure on the Hub's side
    (no network, no token, no rights) is an `OSError` that says so.
    """
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"--repo-id must look like ORG/NAME, got {repo_id!r}.")
    files = validate_folder(folder, allow_extra=allow_extra)
    if dry_run:
        return files
    logger.info("uploading %d files from %s to %s: %s", len(files), folder, repo_id, ", ".join(files))
    from huggingface_hub import HfApi

    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision and revision != "main" and not create_pr:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or "Upload Engram model converted with engram-hf",
            ignore_patterns=IGNORE_PATTERNS,
        )
    except Exception as error:  # httpx / huggingface_hub errors: not all are OSErrors
        raise OSError(f"Upload of {folder} to {repo_id} failed: {type(error).__name__}: {error}") from error
