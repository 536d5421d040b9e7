"""Hub model cards for VLMamba checkpoints, filled from `model_cards/TEMPLATE.md`-style fields.

Used by the converters and the trainer: `write_model_card(folder, ...)` writes `README.md` (the Hub's
model card) into a checkpoint folder, with YAML metadata the Hub indexes (library_name, pipeline_tag,
tags, base_model, license, datasets, model-index results).
"""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATE = """---
{metadata}
---

# {title}

{summary}

VLMamba is a vision-language model built only from Mamba state-space layers (no attention): a
{vision_description}, a bridger (Linear -> GELU -> Linear) and a Mamba language model
({text_description}). Generation runs on a recurrent-state cache: after the prompt, each new token
costs the same time and memory whatever the context length.

## Intended use

{intended_use}

## How to load

```python
{load_snippet}
```

## Training and sources

{sources}

## Evaluation

{evaluation}

## Limits

{limits}
"""

DEFAULT_LIMITS = (
    "- Research and demonstration model; outputs are not checked for safety or factuality.\n"
    "- Images are resized to the configured square size; fine detail beyond it is lost.\n"
    "- Quality outside the training distribution is unknown; evaluate on your own data first."
)


def _yaml_value(value, indent: int = 0) -> str:
    pad = "  " * indent
    if isinstance(value, dict):
        return "\n".join(
            f"{pad}{key}:"
            + ("\n" + _yaml_value(v, indent + 1) if isinstance(v, (dict, list)) else f" {_scalar(v)}")
            for key, v in value.items()
        )
    if isinstance(value, list):
        lines = []
        for item in value:
            if isinstance(item, dict):
                body = _yaml_value(item, indent + 1).lstrip()
                lines.append(f"{pad}- {body}")
            else:
                lines.append(f"{pad}- {_scalar(item)}")
        return "\n".join(lines)
    return pad + _scalar(value)


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def card_metadata(
    license: str = "apache-2.0",
    base_model: str | list[str] | None = None,
    datasets: list[str] | None = None,
    results: list[dict] | None = None,
    model_name: str = "vlm-mamba",
    extra_tags: list[str] | None = None,
) -> dict:
    """The YAML metadata dict. `results`: [{"task", "dataset", "split", "metric", "value"}, ...]."""
    meta: dict = {
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "license": license,
        "tags": ["mamba", "state-space-model", "vision-language", "vlm-mamba", *(extra_tags or [])],
    }
    if base_model:
        meta["base_model"] = base_model if isinstance(base_model, list) else [base_model]
    if datasets:
        meta["datasets"] = list(datasets)
    if results:
        entries = []
        for r in results:
            entries.append(
                {
                    "task": {"type": r.get("task", "image-text-to-text")},
                    "dataset": {"name": r["dataset"], "type": r["dataset"], "split": r.get("split", "test")},
                    "metrics": [{"type": r["metric"], "value": r["value"]}],
                }
            )
        meta["model-index"] = [{"name": model_name, "results": entries}]
    return meta


def render_model_card(
    title: str,
    summary: str,
    config: dict,
    metadata: dict,
    intended_use: str = "Image captioning and visual question answering in English.",
    sources: str = "",
    evaluation: str = "Not evaluated.",
    limits: str = DEFAULT_LIMITS,
    repo_id: str = "PATH_OR_REPO_ID",
) -> str:
    """The model card text for a checkpoint whose config.json content is `config`."""
    vision, text = config.get("vision_config", {}), config.get("text_config", {})
    if config.get("vision_mode", "encoder") == "fuyu":
        vision_description = f"Fuyu-style linear patch projection ({vision.get('patch_size')} px patches)"
    else:
        stride = vision.get("patch_stride")
        patches = f"{vision.get('patch_size')} px patches"
        if stride and stride != vision.get("patch_size"):
            patches += f" every {stride} px (overlapping)"
        if vision.get("num_hidden_layers"):
            vision_description = (
                f"bidirectional Mamba vision encoder ({vision.get('num_hidden_layers')} layers, width "
                f"{vision.get('hidden_size')}, {patches})"
            )
        else:
            vision_description = (
                f"Conv2d patch embedding, no Mamba layers (width {vision.get('hidden_size')}, {patches})"
            )
    text_description = (
        f"{text.get('model_type', 'mamba')}, {text.get('num_hidden_layers')} layers, width {text.get('hidden_size')}, "
        f"vocabulary {text.get('vocab_size')}"
    )
    load_snippet = (
        "import vlm_mamba_hf  # or pass trust_remote_code=True to a folder exported with export-remote-code\n"
        "from transformers import pipeline\n\n"
        f'pipe = pipeline("image-text-to-text", model="{repo_id}")\n'
        'pipe(images="image.png", text="<image>", max_new_tokens=30)'
    )
    return TEMPLATE.format(
        metadata=_yaml_value(metadata),
        title=title,
        summary=summary,
        vision_description=vision_description,
        text_description=text_description,
        intended_use=intended_use,
        load_snippet=load_snippet,
        sources=sources or "See the repository that produced this checkpoint.",
        evaluation=evaluation,
        limits=limits,
    )


def write_model_card(folder: str | Path, **kwargs) -> Path:
    """Render a card from `folder/config.json` and write it to `folder/README.md`; returns the path."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    path = folder / "README.md"
    path.write_text(render_model_card(config=config, **kwargs))
    return path


__all__ = ["card_metadata", "render_model_card", "write_model_card", "TEMPLATE"]
