"""Loading Hugging Face causal LMs and tokenizers, local or remote, and checking they fit together.

Checks that only need ``config.json`` run on the driver before any heavy pass: a missing model,
pre-trained and fine-tuned models of different architectures or shapes, a tokenizer whose ids do
not fit the embedding. Non-finite weights are caught when a worker loads the model.

Weights are read from safetensors files only: a directory with only pickled weights
(``pytorch_model.bin``) is refused, since unpickling can run arbitrary code, even with
``trust_remote_code`` on (that setting is about the model's Python code, not its weights).

Remote models (``s3://...``) are downloaded once per node into ``$MSIF_CACHE/models`` (see
``local_dir``): the cache entry is keyed by the URL and by the content of the remote files as
their listing reports it (relative name, size, and the ETag, else the modification time), so a
model replaced at the same URL is fetched again, and an unchanged one never is. The download
runs under a file lock on the entry, into a folder of its own, renamed into place when complete:
concurrent workers of one node wait for the first one's copy instead of writing into one folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid

import fsspec
import torch
from filelock import FileLock
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from msif_ray.config import cache_root
from msif_ray.engine.modules import check_finite_weights
from msif_ray.store.storage import with_retries
from msif_ray.errors import UserError

# Config fields that fix the shapes of the weights; two models must agree on all of them.
SHAPE_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads",
    "n_head", "num_key_value_heads", "intermediate_size", "n_inner", "rotary_pct", "head_dim",
)


class ModelError(UserError, ValueError):
    """A model or tokenizer that cannot be used as configured."""


DOWNLOAD_TIMEOUT = 6 * 3600  # seconds a worker waits for another one's download of the same model


def local_dir(path: str) -> str:
    """A local directory holding ``path``: itself if local, else a cached copy of the remote directory.

    The copy lives at ``$MSIF_CACHE/models/<hash of the URL>-<content key>`` (``content_key``) and
    is made once per node: under a file lock, into ``<entry>.partial-<random>``, renamed into place.
    """
    if "://" not in path or path.startswith("file://"):
        return path.removeprefix("file://")
    fs, remote = fsspec.core.url_to_fs(path)
    remote = remote.rstrip("/")
    listing = with_retries(lambda: fs.find(remote, detail=True), f"list {path}")
    if not listing:
        raise FileNotFoundError(f"{path}: no such model directory (no file under it)")
    target = cache_root() / "models" / f"{hashlib.sha256(path.encode()).hexdigest()[:12]}-{content_key(remote, listing)}"
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=DOWNLOAD_TIMEOUT):
        if not target.exists():  # another worker of this node may have finished it while we waited
            partial = target.with_name(f"{target.name}.partial-{uuid.uuid4().hex[:8]}")
            try:
                with_retries(lambda: fs.get(remote + "/", str(partial), recursive=True), f"download {path}")
                partial.rename(target)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def content_key(root: str, listing: dict[str, dict]) -> str:
    """A digest of a remote directory's files: relative name, size and ETag (else mtime) of each."""
    entries = []
    for name, info in sorted(listing.items()):
        version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or info.get("created")
        entries.append([name[len(root):].lstrip("/"), info.get("size"), str(version)])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def check_safetensors(directory: str, key: str, path: str) -> None:
    """Refuse a model directory whose weights are not in safetensors files (pickled weights can run code)."""
    files = os.listdir(directory)
    if any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files):
        return
    pickled = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt")) or f.endswith(".bin.index.json")]
    found = f"it holds only pickled weights ({', '.join(sorted(pickled)[:3])})" if pickled else "it holds no weights"
    raise ModelError(f"{key}: no safetensors weights in {path!r}: {found}. msif-ray loads safetensors only, since "
                     "unpickling a checkpoint can run arbitrary code; convert it once where you trust it: "
                     "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")


def load_config(path: str, key: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config; ``key`` (e.g. ``models.pretrained``) names the setting in errors."""
    try:
        directory = local_dir(path)
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"{key}: no usable Hugging Face model at {path!r} ({err.__class__.__name__}: {err})") from err
    check_safetensors(directory, key, path)
    return config


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
    """A causal LM with ``dtype`` weights on ``device`` (bf16 compute on CUDA also via autocast), checked for NaN/inf.

    Safetensors weights only: a pickled checkpoint is refused (``check_safetensors``).
    """
    directory = local_dir(path)
    check_safetensors(directory, "model", path)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 use_safetensors=True)
    model.to(device).eval()
    check_finite_weights(model)
    return model
