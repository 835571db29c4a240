"""Loading Hugging Face causal LMs and tokenizers, local or remote, and checking they fit together.

Checks that only need ``config.json`` run on the driver before any heavy pass: a missing model,
pre-trained and fine-tuned models of different architectures or shapes, a tokenizer whose ids do
not fit the embedding. Non-finite weights are caught when a worker loads the model.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import fsspec
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from msif_ray.modules import check_finite_weights

# Config fields that fix the shapes of the weights; two models must agree on all of them.
SHAPE_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads",
    "n_head", "num_key_value_heads", "intermediate_size", "n_inner", "rotary_pct", "head_dim",
)


class ModelError(ValueError):
    """A model or tokenizer that cannot be used as configured."""


def cache_root() -> Path:
    return Path(os.environ.get("MSIF_CACHE", Path.home() / ".cache" / "msif-ray"))


def local_dir(path: str) -> str:
    """A local directory holding ``path``: itself if local, else a cached copy of the remote directory."""
    if "://" not in path or path.startswith("file://"):
        return path.removeprefix("file://")
    target = cache_root() / "models" / hashlib.sha256(path.encode()).hexdigest()[:16]
    if not (target / "config.json").exists():
        fs, remote = fsspec.core.url_to_fs(path)
        partial = target.with_name(target.name + ".partial")
        fs.get(remote.rstrip("/") + "/", str(partial), recursive=True)
        partial.rename(target)
    return str(target)


def load_config(path: str, key: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config; ``key`` (e.g. ``models.pretrained``) names the setting in errors."""
    try:
        return AutoConfig.from_pretrained(local_dir(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"{key}: no usable Hugging Face model at {path!r} ({err.__class__.__name__}: {err})") from err


def shape_signature(config: PretrainedConfig) -> dict[str, object]:
    values = config.to_dict()
    return {k: values[k] for k in SHAPE_FIELDS if k in values}


def check_same_shapes(pretrained: PretrainedConfig, finetuned: PretrainedConfig) -> None:
    """The fine-tuned model must be the pre-trained one with other weights: same architecture and shapes."""
    a, b = shape_signature(pretrained), shape_signature(finetuned)
    differing = [k for k in a.keys() | b.keys() if a.get(k) != b.get(k)]
    if differing:
        details = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(differing))
        raise ModelError(f"models.pretrained and models.finetuned differ in architecture or shape ({details})")


def load_tokenizer(path: str, key: str = "models.tokenizer", trust_remote_code: bool = False):
    try:
        tokenizer = AutoTokenizer.from_pretrained(local_dir(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"{key}: no usable tokenizer at {path!r} ({err.__class__.__name__}: {err})") from err
    if not tokenizer.is_fast:
        raise ModelError(f"{key}: the tokenizer at {path!r} is not a fast tokenizer (offsets are needed)")
    return tokenizer


def check_tokenizer_fits(tokenizer, config: PretrainedConfig, key: str) -> None:
    """Every token id must index the model's embedding matrix."""
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ModelError(
            f"the tokenizer has {len(tokenizer)} tokens but {key} embeds only {vocab}: "
            "it is not this model's tokenizer (set models.tokenizer)"
        )


def model_skeleton(config: PretrainedConfig, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model's module tree on the meta device: its layer names and shapes, no weights, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def pick_device(num_gpus: float) -> torch.device:
    """CUDA when GPUs were requested (an error, not a silent CPU fall-back, when there is none)."""
    if num_gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ModelError(f"ray.num_gpus_per_worker is {num_gpus} but this worker sees no CUDA device "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); set it to 0 to run on CPU")
    torch.backends.cuda.matmul.allow_tf32 = True  # factor and query math in float32 runs on TF32 tensor cores
    torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda")


def weight_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 weights on a GPU that supports them, float32 elsewhere (``bf16`` / ``fp32`` force it).

    Hooked activations and output gradients are promoted to float32 in either case, so factors
    and scores accumulate in float32.
    """
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return torch.float32
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if precision == "bf16":
            raise ModelError("ray.precision is bf16 but this GPU does not support bfloat16; use fp32 or auto")
        return torch.float32
    return torch.bfloat16


def load_model(path: str, device: torch.device, trust_remote_code: bool = False,
               dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A causal LM with ``dtype`` weights on ``device`` (bf16 compute on CUDA also via autocast), checked for NaN/inf."""
    model = AutoModelForCausalLM.from_pretrained(local_dir(path), dtype=dtype, trust_remote_code=trust_remote_code)
    model.to(device).eval()
    check_finite_weights(model)
    return model
