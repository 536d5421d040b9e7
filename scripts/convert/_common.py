"""Helpers shared by the checkpoint converters: safe loading, key/shape checks, vocabulary growth, output folders.

Loading never runs a plain unpickle: `.bin`/`.pt`/`.pth` files go through `torch.load(weights_only=True)`
with an explicit allow-list, so a pickle holding arbitrary objects is refused instead of executed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# Parameter names of one Mamba-1 mixer: mamba_ssm's `Mamba`, transformers' `MambaMixer` and VLMamba's mixer agree.
MIXER_PARAMS = (
    "in_proj.weight",
    "in_proj.bias",
    "conv1d.weight",
    "conv1d.bias",
    "x_proj.weight",
    "dt_proj.weight",
    "dt_proj.bias",
    "A_log",
    "D",
    "out_proj.weight",
    "out_proj.bias",
)
MIXER_PATTERN = "|".join(re.escape(p) for p in MIXER_PARAMS)

# Parameter names of one Mamba-2 mixer: mamba_ssm's `Mamba2` (rmsnorm=True), transformers' `Mamba2Mixer` and
# VLMamba's `VLMambaMamba2Mixer` agree. in_proj's rows are [z, x, B, C, dt] in all three.
MAMBA2_MIXER_PARAMS = (
    "in_proj.weight",
    "in_proj.bias",
    "conv1d.weight",
    "conv1d.bias",
    "dt_bias",
    "A_log",
    "D",
    "norm.weight",
    "out_proj.weight",
    "out_proj.bias",
)
MAMBA2_MIXER_PATTERN = "|".join(re.escape(p) for p in MAMBA2_MIXER_PARAMS)


class UnsafeCheckpointError(ValueError):
    """A pickle holds objects outside the allow-list (it could run code if unpickled)."""


class ConversionError(RuntimeError):
    """A converted checkpoint failed its verification (reload or logits parity)."""


# What the command lines report as a one-line "error: ..." instead of a traceback.
EXPECTED_ERRORS = (ValueError, NotImplementedError, OSError, ConversionError)


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def torch_load_safely(path: str | os.PathLike, allowed_globals: Iterable[type] = ()) -> Any:
    """`torch.load(path, weights_only=True)` with `allowed_globals` allow-listed; clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        detail = f"it references {found.group(1)}" if found else str(error).splitlines()[0]
        raise UnsafeCheckpointError(
            f"Refusing to load {path}: the pickle holds objects other than tensors and plain containers "
            f"({detail}). Unpickling such a file can run arbitrary code, so only `weights_only` loading is "
            "allowed. Re-save the weights as a plain state dict of tensors (or as safetensors) with code you trust."
        ) from error
    except (RuntimeError, OSError, EOFError) as error:
        raise ValueError(
            f"Could not read {path} ({type(error).__name__}: {error}). The file may be truncated or corrupted; "
            "download or copy it again."
        ) from error


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file on CPU, with an error naming the file when it is truncated or corrupted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file not found: {path}")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"Could not read the safetensors file {path}: {error}. The file is truncated or corrupted; "
            "download or copy it again."
        ) from error


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from one `.safetensors` file or a `weights_only` pickle (`.bin`, `.pt`, `.pth`, `.ckpt`)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        state_dict = torch_load_safely(path)
        return require_state_dict(state_dict, str(path))
    raise ValueError(f"Unsupported weights file {path}: expected .safetensors or one of {PICKLE_SUFFIXES}.")


def load_weights_folder(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All weights of a saved model folder: `model.safetensors`, sharded safetensors or `pytorch_model.bin`."""
    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = folder / index_name
        if index_path.is_file():
            weight_map = read_json(index_path).get("weight_map", {})
            shards = sorted(set(weight_map.values()))
            missing = [name for name in shards if not (folder / name).is_file()]
            if missing:
                raise FileNotFoundError(f"{index_path} lists shard files that are missing: {missing}.")
            state_dict: dict[str, torch.Tensor] = {}
            for name in shards:
                state_dict.update(load_weights_file(folder / name))
            absent = sorted(set(weight_map) - set(state_dict))
            if absent:
                raise ValueError(f"{index_path} lists tensors that no shard holds: {absent}.")
            return state_dict
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return load_weights_file(folder / name)
    raise FileNotFoundError(
        f"No weights in {folder}: looked for model.safetensors, model.safetensors.index.json, pytorch_model.bin "
        "and pytorch_model.bin.index.json."
    )


def require_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Check that `obj` is a flat mapping of names to tensors (a state dict)."""
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{source} does not hold a state dict (a mapping of names to tensors): got {type(obj)}."
        )
    bad = [
        str(key)
        for key, value in obj.items()
        if not isinstance(key, str) or not isinstance(value, torch.Tensor)
    ]
    if bad:
        raise ValueError(f"{source} is not a flat state dict: these entries are not tensors: {bad[:20]}.")
    return dict(obj)


def read_json(path: Path) -> dict:
    """Parse a JSON object file with an error naming the file."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}.") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def to_float32(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point tensors cast to float32 (other dtypes unchanged)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def dominant_float_dtype(state_dict: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding the most parameters (float32 when there is none)."""
    counts: dict[torch.dtype, int] = {}
    for value in state_dict.values():
        if value.is_floating_point():
            counts[value.dtype] = counts.get(value.dtype, 0) + value.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys starting with `prefix`, with the prefix removed (others are left out)."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def mixer_config_from_weights(state_dict: Mapping[str, torch.Tensor], prefix: str, hidden_size: int) -> dict:
    """Mamba-1 mixer hyper-parameters (config field names) read from the shapes of the mixer at `prefix`."""
    d_inner, state_size = state_dict[prefix + "A_log"].shape
    if d_inner % hidden_size:
        raise ValueError(
            f"{prefix}A_log: mixer width {d_inner} is not a multiple of the hidden size {hidden_size}."
        )
    return {
        "state_size": state_size,
        "expand": d_inner // hidden_size,
        "conv_kernel": state_dict[prefix + "conv1d.weight"].shape[-1],
        "time_step_rank": state_dict[prefix + "dt_proj.weight"].shape[1],
        "use_bias": prefix + "in_proj.bias" in state_dict,
        "use_conv_bias": prefix + "conv1d.bias" in state_dict,
    }


# ----------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------


def check_keys_and_shapes(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    what: str = "the converted weights",
    allow_missing: bool = False,
) -> None:
    """Raise one ValueError listing every unknown key, missing key and shape mismatch (with both shapes)."""
    unknown = sorted(set(state_dict) - set(expected))
    missing = [] if allow_missing else sorted(set(expected) - set(state_dict))
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key])}"
        for key in sorted(set(state_dict) & set(expected))
        if tuple(state_dict[key].shape) != tuple(expected[key])
    ]
    problems = []
    if unknown:
        problems.append(
            f"{len(unknown)} unknown key(s) with no place in the model:\n  " + "\n  ".join(unknown)
        )
    if missing:
        problems.append(f"{len(missing)} missing key(s):\n  " + "\n  ".join(missing))
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es):\n  " + "\n  ".join(mismatched))
    if problems:
        raise ValueError(f"Cannot load {what}:\n" + "\n".join(problems))


def load_checked(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Load a complete state dict into `model` after listing every key or shape problem at once."""
    check_keys_and_shapes(state_dict, {k: v.shape for k, v in model.state_dict().items()}, what)
    model.load_state_dict(state_dict, strict=True)


def raise_on_unknown_keys(keys: Iterable[str], what: str, hint: str = "") -> None:
    """Raise a ValueError listing every key in `keys` (when there are any)."""
    keys = sorted(keys)
    if keys:
        raise ValueError(
            f"{len(keys)} unknown key(s) in {what}:\n  " + "\n  ".join(keys) + (f"\n{hint}" if hint else "")
        )


# ----------------------------------------------------------------------------------------------------------
# Vocabulary and tokenizer
# ----------------------------------------------------------------------------------------------------------


def grow_rows(weight: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(V, d) -> (num_rows, d); new rows are the mean of the existing ones. Never shrinks."""
    if num_rows <= weight.shape[0]:
        return weight
    extra = weight.float().mean(dim=0, keepdim=True).to(weight.dtype).expand(num_rows - weight.shape[0], -1)
    return torch.cat([weight, extra], dim=0)


def has_tokenizer(folder: Path) -> bool:
    """Whether a folder holds tokenizer files."""
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: Path):
    """AutoTokenizer from local files only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def ensure_image_token(tokenizer, image_token: str) -> tuple[int, bool]:
    """Make `image_token` one special token of `tokenizer`; returns (its id, whether it was added)."""
    ids = tokenizer.encode(image_token, add_special_tokens=False)
    if len(ids) == 1 and ids[0] != getattr(tokenizer, "unk_token_id", None):
        return ids[0], False
    tokenizer.add_special_tokens({"extra_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    ids = tokenizer.encode(image_token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"The tokenizer still splits {image_token!r} into {ids} after adding it as a special token."
        )
    return ids[0], True


def save_tokenizer_and_processor(
    folder: Path, tokenizer, image_size: int, image_seq_length: int, image_token: str, image_processor=None
) -> str | None:
    """Save a VLMambaProcessor (image processor + tokenizer); without the processor module, only the tokenizer.

    Returns a note for the final report when the processor could not be written, else None.
    """
    try:
        from vlm_mamba_hf.image_processing_vlm_mamba import VLMambaImageProcessor
        from vlm_mamba_hf.processing_vlm_mamba import VLMambaProcessor
    except ImportError as error:
        tokenizer.save_pretrained(str(folder))
        return f"TODO: no VLMambaProcessor saved ({error}); only the tokenizer. Re-run once the processor exists."
    size = {"height": image_size, "width": image_size}
    if image_processor is None:
        image_processor = VLMambaImageProcessor(size=size)
    else:
        image_processor = VLMambaImageProcessor(
            size=size, image_mean=image_processor.image_mean, image_std=image_processor.image_std
        )
    processor = VLMambaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_token=image_token,
        image_seq_length=image_seq_length,
    )
    processor.save_pretrained(str(folder))
    return None


# ----------------------------------------------------------------------------------------------------------
# Output folders and reports
# ----------------------------------------------------------------------------------------------------------


@contextmanager
def staged_output(
    output: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a fresh staging folder beside `output`; move it to `output` only when the block succeeds.

    An existing non-empty `output` is refused unless `overwrite`; an output that is (or contains) one of the
    `inputs` is always refused. A failed conversion leaves `output` untouched and removes the staging folder.
    """
    output = Path(output).absolute()
    for source in inputs:
        source = Path(source).absolute()
        if source == output or output in source.parents:
            raise ValueError(
                f"The output {output} would replace the input {source}; choose another --output."
            )
    if output.exists():
        if output.is_file():
            if not overwrite:
                raise FileExistsError(
                    f"--output {output} is an existing file; pass --overwrite to replace it."
                )
        elif any(output.iterdir()) and not overwrite:
            raise FileExistsError(
                f"--output {output} exists and is not empty; refusing to overwrite it. Choose a new folder or "
                "pass --overwrite to replace its contents."
            )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.converting-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should follow the user's umask
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.is_dir():
        shutil.rmtree(output)
    elif output.exists():
        output.unlink()
    staging.rename(output)


@dataclass
class ConversionReport:
    """What a conversion did with each tensor: mapped, mapped approximately, dropped, or freshly initialised."""

    mapped: int = 0
    approximate: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        """A readable multi-line summary."""
        lines = [f"mapped tensors: {self.mapped}"]
        for title, items in (
            ("mapped approximately", self.approximate),
            ("dropped (no counterpart)", self.dropped),
            ("freshly initialised", self.fresh),
            ("notes", self.notes),
        ):
            if items:
                lines.append(f"{title}: {len(items)}")
                lines.extend(f"  - {item}" for item in items)
        return "\n".join(lines)


def summarize_keys(keys: Iterable[str]) -> list[str]:
    """Collapse per-layer keys (`layers.3.x` -> `layers.*.x`) with counts, for short reports."""
    counts: dict[str, int] = {}
    for key in keys:
        pattern = re.sub(r"\.\d+\.", ".*.", key)
        counts[pattern] = counts.get(pattern, 0) + 1
    return [f"{pattern} (x{n})" if n > 1 else pattern for pattern, n in sorted(counts.items())]
