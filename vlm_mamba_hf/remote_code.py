"""Export a checkpoint folder with the model code beside it, for `trust_remote_code=True` loading.

The model code is flat in this package (sibling modules with relative imports only), exactly the shape
transformers' dynamic-module loader follows, so the export copies those files and writes `auto_map`
entries into the folder's JSON files. The result loads with `AutoModelForImageTextToText` /
`AutoProcessor` / `pipeline(...)` and `trust_remote_code=True` where `vlm_mamba_hf` is not installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent

CODE_FILES = (
    "configuration_vlm_mamba.py",
    "modeling_vlm_mamba.py",
    "cache_vlm_mamba.py",
    "ssm_ops.py",
    "ops_ssd.py",
    "cpu_kernels.py",
    "fused_loss.py",
    "image_contrast.py",
    "image_processing_vlm_mamba.py",
    "processing_vlm_mamba.py",
)

MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_vlm_mamba.VLMambaConfig",
    "AutoModel": "modeling_vlm_mamba.VLMambaModel",
    "AutoModelForCausalLM": "modeling_vlm_mamba.VLMambaForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_vlm_mamba.VLMambaForConditionalGeneration",
}
PROCESSOR_AUTO_MAP = {
    "AutoProcessor": "processing_vlm_mamba.VLMambaProcessor",
    "AutoImageProcessor": "image_processing_vlm_mamba.VLMambaImageProcessor",
}


def _update_json(path: Path, update) -> None:
    data = json.loads(path.read_text())
    update(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def export_remote_code(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Copy the checkpoint folder `src` to `out`, add the model code files and the `auto_map` entries.

    `src` is left untouched; an existing non-empty `out` is refused unless `overwrite=True`.
    """
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not a checkpoint folder: it has no config.json.")
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") != "vlm_mamba":
        raise ValueError(
            f"{src}/config.json has model_type {config.get('model_type')!r}, expected 'vlm_mamba'."
        )
    if out.resolve() == src.resolve():
        raise ValueError(
            "The output folder must differ from the source folder (the source is never modified)."
        )
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out} exists and is not empty; choose another folder or pass overwrite=True."
            )
        shutil.rmtree(out)
    shutil.copytree(src, out, dirs_exist_ok=True)
    for name in CODE_FILES:
        shutil.copy2(PACKAGE_DIR / name, out / name)

    _update_json(out / "config.json", lambda data: data.__setitem__("auto_map", dict(MODEL_AUTO_MAP)))
    if (out / "processor_config.json").is_file():

        def add_processor_map(data):
            data["auto_map"] = dict(PROCESSOR_AUTO_MAP)
            if isinstance(data.get("image_processor"), dict):
                data["image_processor"]["auto_map"] = {
                    "AutoImageProcessor": PROCESSOR_AUTO_MAP["AutoImageProcessor"]
                }

        _update_json(out / "processor_config.json", add_processor_map)
    if (out / "preprocessor_config.json").is_file():
        _update_json(
            out / "preprocessor_config.json",
            lambda data: data.__setitem__("auto_map", dict(PROCESSOR_AUTO_MAP)),
        )
    if (out / "tokenizer_config.json").is_file():
        _update_json(
            out / "tokenizer_config.json",
            lambda data: data.__setitem__("auto_map", {"AutoProcessor": PROCESSOR_AUTO_MAP["AutoProcessor"]}),
        )
    return out


__all__ = ["export_remote_code", "CODE_FILES"]
