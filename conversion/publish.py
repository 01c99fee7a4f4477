"""Validate a converted Engram repository folder and upload it to the Hugging Face Hub."""

from __future__ import annotations

import json
import re
from pathlib import Path

REQUIRED_TAGS = ("engram", "custom_code")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
IGNORE_PATTERNS = ["*.tmp*", ".cache/*", "__pycache__/*", "*.pyc"]


def validate_folder(folder: str | Path) -> list[str]:
    """Check that `folder` is a complete Engram model repository; return its files (relative, sorted).

    Raises `ValueError` naming the first problem: config not loadable or without Engram fields/auto_map, remote-code
    files missing, a shard named in `model.safetensors.index.json` missing, no tokenizer, or invalid card metadata.
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

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as error:
            raise ValueError(f"Invalid {index.name}: {error}") from error
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise ValueError(f"Shards listed in {index.name} are missing: {missing}")
    elif not (folder / "model.safetensors").is_file():
        raise ValueError(f"{folder} has neither model.safetensors nor model.safetensors.index.json.")
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

    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not any(fnmatch.fnmatch(rel, pattern) for pattern in IGNORE_PATTERNS):
            files.append(rel)
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
):
    """Validate `folder` and upload it to `repo_id` (created if needed).

    Returns the list of files for a dry run, otherwise the `CommitInfo` of the upload.
    """
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"--repo-id must look like ORG/NAME, got {repo_id!r}.")
    files = validate_folder(folder)
    if dry_run:
        return files
    from huggingface_hub import HfApi

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
