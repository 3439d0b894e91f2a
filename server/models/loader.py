"""Checkpoint directory → a loaded model: resolve the directory (local or hub download),
read config.json, pick the family (registry), stream the safetensors into the model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from vlmserve.models.registry import family_for_config
from vlmserve.models.layers.parallel import SINGLE, TPGroup

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_model_dir(path_or_repo_id: str | Path, revision: str | None = None) -> Path:
    """A local directory is returned as is; anything else is taken as a hub repo id and
    downloaded (config, tokenizer and safetensors files only) into the HF cache."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    repo_id = str(path_or_repo_id)
    if path.is_absolute() or repo_id.startswith(".") or repo_id.count("/") != 1:
        raise FileNotFoundError(
            f"model {repo_id!r} is not a local directory and not a hub repo id of the form 'owner/name'"
        )
    from huggingface_hub import snapshot_download

    logger.info("downloading %s from the Hugging Face hub", repo_id)
    try:
        local = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.tiktoken", "*.txt"],
        )
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        raise FileNotFoundError(
            f"model {repo_id!r} is not a local directory and could not be downloaded from the hub "
            f"({type(e).__name__}: {e}); pass a local checkpoint directory, or check the repo id, "
            "network access and HF_TOKEN"
        ) from e
    return Path(local)


MISTRAL_FORMAT_ARCHITECTURE = "PixtralForConditionalGeneration"


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json; or, for a Mistral-format checkpoint (params.json, no config.json), a
    stand-in `{"architectures": [...], "mistral_params": <params.json>}` the registry maps to
    the family that reads that format (Pixtral: params.json with a vision_encoder section)."""
    path = Path(model_dir) / "config.json"
    params = Path(model_dir) / "params.json"
    if not path.is_file() and params.is_file():
        mistral_params = json.loads(params.read_text())
        if not mistral_params.get("vision_encoder"):
            raise ValueError(
                f"{params} describes a Mistral-format text-only model; only Mistral-format Pixtral "
                "(params.json with a vision_encoder section) is supported"
            )
        return {"architectures": [MISTRAL_FORMAT_ARCHITECTURE], "mistral_params": mistral_params}
    if not path.is_file():
        raise FileNotFoundError(
            f"{model_dir} has no config.json (nor a Mistral-format params.json); is it a checkpoint directory?"
        )
    return json.loads(path.read_text())


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's shards: those named by model.safetensors.index.json, else
    model.safetensors, else every *.safetensors in the directory (sorted)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shards that are not there: {', '.join(absent)}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no safetensors weights in {model_dir} (only the safetensors format is supported; convert "
            ".bin checkpoints with transformers' save_pretrained(safe_serialization=True))"
        )
    return files


def iter_safetensors(model_dir: str | Path, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for every tensor of every shard, shard by shard; one tensor in
    memory at a time beyond what the caller keeps."""
    files = safetensors_files(model_dir)
    for i, path in enumerate(tqdm(files, desc="Loading shards", unit="shard", disable=not progress)):
        logger.info("loading weights from %s (%d/%d)", path.name, i + 1, len(files))
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
    """'auto': float32 on CPU, the checkpoint's dtype elsewhere (bfloat16 if it names none)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        dtype = checkpoint_dtype or "bfloat16"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load_model(
    model_dir: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu", progress: bool = True,
    tp: TPGroup = SINGLE,
) -> tuple[torch.nn.Module, Any]:
    """Build the family's model for `model_dir` and load its weights. Returns (model in eval
    mode, the family's parsed model config). Raises on any missing or unexpected weight.
    `tp`: this rank's tensor-parallel group; the model keeps only its shard of the weights."""
    model_dir = Path(model_dir)
    hf_config = read_hf_config(model_dir)
    family = family_for_config(hf_config)
    model_config = family.parse_config(hf_config)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, getattr(model_config, "checkpoint_dtype", None), device)
    logger.info("building %s (%s) on %s in %s", family.name, hf_config["architectures"][0], device, torch_dtype)
    cls = family.model_class()
    if tp.size == 1:
        model = cls(model_config, torch_dtype, device)
    elif not getattr(cls, "supports_tensor_parallel", False):
        raise ValueError(
            f"--tensor-parallel-size {tp.size}: the {family.name} family does not support tensor parallelism yet; "
            "serve it with --tensor-parallel-size 1"
        )
    else:
        model = cls(model_config, torch_dtype, device, tp=tp)
    with torch.no_grad():
        model.load_weights(iter_safetensors(model_dir, progress=progress))
    model.eval()
    return model, model_config
