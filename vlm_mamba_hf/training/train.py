"""Train VLMamba with `transformers.Trainer` from a recipe; one script for one process, torchrun and accelerate.

    python -m vlm_mamba_hf.training.train --recipe default --output-dir runs/default
    vlm-mamba train --recipe default                                   # the same, through the CLI
    torchrun --nproc_per_node 2 -m vlm_mamba_hf.training.train --recipe tiny --output-dir runs/ddp
    accelerate launch --multi_gpu --num_processes 2 -m vlm_mamba_hf.training.train --recipe tiny --output-dir runs/acc

The final checkpoint folder (`<output-dir>/final` unless `--save-dir`) holds config.json,
model.safetensors, the processor (tokenizer + image processor), generation_config.json, the recipe, the
evaluation results and a model card (README.md): it loads with `from_pretrained` and with
`pipeline("image-text-to-text", model=...)`. Intermediate Trainer checkpoints (`checkpoint-<step>`) resume
with `--resume-from-checkpoint`; a checkpoint of another model config is refused with the differing fields.
On a machine without CUDA, accelerate's multi-process launcher (`--multi_gpu`) runs the processes on CPU with
gloo; `accelerate launch --cpu` starts a single process. See docs/training.md for multi-GPU, multi-node and
FSDP launches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from ..configuration_vlm_mamba import VLMambaConfig
from ..data.easy_vqa import EASY_VQA_ANSWER_TYPES
from ..modeling_vlm_mamba import VLMambaForConditionalGeneration
from .recipes import (
    Recipe,
    build_collator,
    build_focus_dataset,
    build_model_config,
    build_processor,
    build_train_dataset,
    focus_recipe,
    get_recipe,
)

logger = logging.getLogger(__name__)

# Config fields that may differ between a checkpoint and the model resuming from it (bookkeeping only).
_IGNORED_CONFIG_KEYS = frozenset(
    {"transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "use_cache", "lora"}
)


def _machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = "CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            name = next(
                (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name
            )
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), so bf16 autocast can pay off."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if key in _IGNORED_CONFIG_KEYS:
            continue
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_compatible(checkpoint: str | os.PathLike, config: VLMambaConfig) -> None:
    """Raise a ValueError naming the differing fields when `checkpoint` was saved from another model config."""
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise ValueError(
            f"Cannot resume from {checkpoint}: it has no config.json, so it is not a Trainer checkpoint of this "
            "model. Pass a `checkpoint-<step>` folder written by this training script."
        )
    saved_type = json.loads(path.read_text()).get("model_type")
    if saved_type != config.model_type:
        raise ValueError(
            f"Refusing to resume from {checkpoint}: it holds a {saved_type!r} model, this run trains a "
            f"{config.model_type!r} model."
        )
    saved = _flatten(type(config).from_pretrained(checkpoint).to_dict())
    current = _flatten(config.to_dict())
    differing = [
        f"{key}: checkpoint {saved.get(key)!r} vs this run {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if differing:
        raise ValueError(
            f"Refusing to resume from {checkpoint}: it was saved from a different model config, so its weights "
            "and optimizer state do not fit this model. Differing fields:\n  "
            + "\n  ".join(differing)
            + "\nResume with the recipe and overrides of the original run, or start a new run."
        )


class TimeBudgetCallback(TrainerCallback):
    """Stop training once `budget_s` seconds of training have passed; all ranks stop at the same step.

    `elapsed` is rank 0's training time at the end of the last step, broadcast to every rank, so that a
    schedule reading it (see `VLMambaTrainer`) gives every rank the same learning rate.
    """

    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self.start: float | None = None
        self.elapsed = 0.0
        self.stopped_at_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.elapsed = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = torch.tensor(time.perf_counter() - self.start, dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(elapsed, src=0)
        self.elapsed = float(elapsed)
        if self.elapsed > self.budget_s:
            self.stopped_at_step = state.global_step
            logger.warning(
                "Time budget of %.0f s reached at step %d (max_steps %d): stopping training.",
                self.budget_s,
                state.global_step,
                state.max_steps,
            )
            control.should_training_stop = True
            control.should_save = True
        return control


VISION_PARAMETER_PREFIXES = ("vision_tower.", "multi_modal_projector.")


def is_vision_parameter(name: str) -> bool:
    """Whether a parameter (by its name, with any wrapper prefix) belongs to the image path: the vision tower
    (Fuyu patch projection or VisionMamba encoder, position embedding) or the bridger."""
    return any(prefix in name for prefix in VISION_PARAMETER_PREFIXES)


def _check_vision_lr_scale(scale: float) -> None:
    if scale <= 0:
        raise ValueError(f"vision_lr_scale must be positive, got {scale}.")


def split_vision_param_groups(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scale: float) -> None:
    """Move the image path's parameters of every param group into a copy of that group whose learning rate is
    `scale` times the group's. Call before the optimizer has taken a step and before the scheduler exists
    (the scheduler records each group's starting learning rate)."""
    _check_vision_lr_scale(scale)
    if any(optimizer.state.values()):
        raise RuntimeError("split_vision_param_groups must run before the optimizer's first step.")
    vision = {id(p) for name, p in model.named_parameters() if is_vision_parameter(name)}
    added = []
    for group in optimizer.param_groups:
        moved = [p for p in group["params"] if id(p) in vision]
        if not moved:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in vision]
        added.append(
            {**{k: v for k, v in group.items() if k != "params"}, "params": moved, "lr": group["lr"] * scale}
        )
    for group in added:
        optimizer.add_param_group(group)


class VLMambaTrainer(Trainer):
    """Trainer with a config check on resume, no weight decay on A_log/D/norms/biases, and a time-aware schedule.

    With a `TimeBudgetCallback` among the callbacks and `lr_scheduler_type="cosine"`, the warmup and cosine
    decay run over progress = max(step / max_steps, elapsed / budget): the learning rate reaches its minimum
    when either the steps or the wall-clock budget run out, so a run cut by the budget on a slow or busy
    machine still ends with a decayed learning rate. Without a budget the schedule is transformers' own.
    """

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No checkpoint found in {self.args.output_dir} to resume from.")
        if resume_from_checkpoint:
            check_resume_compatible(resume_from_checkpoint, self.model.config)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        return [
            name
            for name, param in model.named_parameters()
            if not getattr(param, "_no_weight_decay", False)
            and "norm" not in name
            and "pos_embed" not in name
            and not name.endswith("bias")
        ]

    def __init__(self, *args, vision_lr_scale: float = 1.0, **kwargs):
        """`vision_lr_scale`: learning-rate multiplier for the image path (vision tower and bridger), as
        separate optimizer groups (`split_vision_param_groups`); the recipes pass `Recipe.vision_lr_scale`."""
        _check_vision_lr_scale(vision_lr_scale)  # at construction, not at the first step
        super().__init__(*args, **kwargs)
        self.vision_lr_scale = vision_lr_scale

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.vision_lr_scale != 1.0 and not getattr(self, "_vision_groups_made", False):
            split_vision_param_groups(self.model if model is None else model, optimizer, self.vision_lr_scale)
            self._vision_groups_made = True
        return optimizer

    def _time_budget(self) -> TimeBudgetCallback | None:
        return next((c for c in self.callback_handler.callbacks if isinstance(c, TimeBudgetCallback)), None)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        budget = self._time_budget()
        if budget is None or self.args.lr_scheduler_type != "cosine" or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        warmup = self.args.get_warmup_steps(num_training_steps) / max(1, num_training_steps)

        def factor(step: int) -> float:
            progress = min(1.0, max(step / max(1, num_training_steps), budget.elapsed / budget.budget_s))
            if progress < warmup:
                return progress / warmup
            return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / max(1e-8, 1.0 - warmup)))

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        return self.lr_scheduler


def run_focus_stage(
    recipe: Recipe, model: torch.nn.Module, collator, output_dir: str | os.PathLike, **argument_overrides: Any
) -> dict[str, Any]:
    """Train `model` in place through the recipe's focus stage; nothing when `recipe.focus_steps` is 0.

    The stage is a Trainer run of its own (`focus_recipe`: the focus question types, turns, steps and learning
    rate, warmup and cosine over its steps, the whole image path at the full rate) that saves no checkpoints.
    Returns its steps, seconds (rank 0's, the same on every rank), training loss and number of examples.
    """
    if not recipe.focus_steps:
        return {"steps": 0, "seconds": 0.0}
    stage = focus_recipe(recipe)
    dataset = build_focus_dataset(recipe)
    args = training_arguments(
        stage, str(Path(output_dir) / "focus"), **{**argument_overrides, "save_strategy": "no"}
    )
    trainer = VLMambaTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    start = time.perf_counter()
    output = trainer.train()
    seconds = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(seconds, src=0)  # every rank must give the mixture the same budget
    logger.info(
        "Focus stage: %d steps on easy-VQA %s questions in %.0f s (loss %.4f).",
        trainer.state.global_step,
        "/".join(recipe.focus_answer_types),
        float(seconds),
        output.training_loss,
    )
    return {
        "steps": trainer.state.global_step,
        "seconds": float(seconds),
        "train_loss": output.training_loss,
        "examples": len(dataset),
        "answer_types": list(recipe.focus_answer_types),
        "scenes": recipe.focus_scenes,
    }


def mixture_time_budget(recipe: Recipe, focus: dict[str, Any]) -> TimeBudgetCallback | None:
    """The time budget callback of the mixture stage: one budget for both stages, so the mixture gets what
    the focus stage (`run_focus_stage`'s result) left; None without a budget."""
    if not recipe.time_budget_s:
        return None
    return TimeBudgetCallback(max(0.0, recipe.time_budget_s - focus["seconds"]))


def training_arguments(recipe: Recipe, output_dir: str, **overrides: Any) -> TrainingArguments:
    """TrainingArguments for a recipe: CPU-friendly defaults, `remove_unused_columns=False` for the collator."""
    on_cpu = not torch.cuda.is_available() or overrides.pop("use_cpu", False)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        per_device_train_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.grad_accum,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        warmup_steps=recipe.warmup_ratio,
        lr_scheduler_type=recipe.lr_scheduler_type,
        max_steps=recipe.max_steps,
        logging_steps=recipe.logging_steps,
        save_steps=recipe.save_steps,
        save_total_limit=2,
        seed=recipe.seed,
        data_seed=recipe.seed,
        # The examples carry images and text that the collator turns into model inputs.
        remove_unused_columns=False,
        report_to="none",
        use_cpu=on_cpu,
        dataloader_num_workers=0,
        ddp_backend="gloo" if (on_cpu and distributed) else None,
        ddp_find_unused_parameters=False,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def default_generation_config(tokenizer) -> GenerationConfig:
    """Greedy decoding that stops at `<eos>`; 48 new tokens fit the longest shape caption."""
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=48,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


MODEL_NAME = "vlm-mamba-tiny-shapes"
DATASETS = ["easy-vqa", "procedural-shapes"]


def _card_results(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    vqa = evaluation["easy_vqa_test"]
    results = [
        {"dataset": "easy-vqa", "split": "test", "metric": "accuracy", "value": round(vqa["accuracy"], 4)}
    ]
    for key, split in (("shapes_heldout_captions", "heldout"), ("shapes_test_captions", "test")):
        for metric in ("exact_match", "bleu4", "cider_d"):
            results.append(
                {
                    "task": "image-to-text",
                    "dataset": "procedural-shapes",
                    "split": split,
                    "metric": {"bleu4": "bleu", "cider_d": "cider"}.get(metric, metric),
                    "value": round(evaluation[key][metric], 4),
                }
            )
    return results


def model_card_sections(summary: dict[str, Any]) -> dict[str, str]:
    """Title, summary, sources and evaluation text of the card, from a training summary."""
    recipe = summary["recipe"]
    evaluation = summary.get("eval")
    focus = summary.get("focus_stage") or {}
    focus_text = ""
    if focus.get("steps"):
        focus_text = (
            f"First a focus stage of {focus['steps']} steps ({focus['seconds'] / 60:.1f} min, lr "
            f"{recipe['focus_learning_rate']}) on the easy-VQA {'/'.join(focus['answer_types'])} questions"
            + (
                " and the any-colour and any-shape scenes' descriptions and questions"
                if focus.get("scenes")
                else " alone"
            )
            + ", one question per chat; then the mixture below. "
        )
    vision_lr = ""
    if recipe.get("vision_lr_scale", 1.0) != 1.0:
        vision_lr = (
            f" ({recipe['vision_lr_scale']}x for the image path: patch and position embedding, bridger)"
        )
    sources = (
        f"Trained from scratch with `vlm-mamba train --recipe {recipe['name']}` (transformers `Trainer`, AdamW, "
        f"lr {recipe['learning_rate']}{vision_lr}, {recipe['lr_scheduler_type']} schedule, batch "
        f"{recipe['batch_size']} x {recipe['grad_accum']} x {summary['world_size']} process(es)). {focus_text}"
        f"The mixture: {summary['steps']} steps ({summary['train_seconds'] / 60:.1f} min, "
        f"{summary['examples_per_second']:.1f} sequences/s) on {summary.get('machine', 'CPU')}."
    )
    excluded = recipe.get("easy_vqa_exclude_heldout", False)
    if excluded:
        easy_vqa = (
            "the easy-VQA train split without its images of the held-out pairs below (its blue circles, green "
            "triangles and red rectangles"
        )
    elif recipe.get("easy_vqa_limit") is None:
        easy_vqa = "the easy-VQA train split (4,000 images, 38,575 questions"
    else:
        easy_vqa = "the easy-VQA train split (a subset"
    heldout = (
        "never appear in training."
        if excluded
        else "never appear in the shape scenes (easy-VQA's blue circles, green triangles and red rectangles do)."
    )
    data = (
        f"Data: {easy_vqa}; the questions of each image grouped "
        f"into chats of up to {recipe['turns']} turns), and {recipe['shapes_train_scenes']} procedural shape scenes "
        "(`vlm_mamba_hf.data.shapes`, train split: 1-3 coloured circles, squares and triangles on a 3x3 grid) "
        'with their canonical caption (shape before colour: "a square in red at the top left") and template '
        f"questions. The colour-shape pairs red square, green triangle and blue circle {heldout}"
    )
    if recipe.get("any_colour_scenes"):
        described = " and a description without colours" if recipe.get("any_colour_captions") else ""
        data += (
            f" Also {recipe['any_colour_scenes']} any-colour scenes (the same layout, objects in random RGB colours, "
            "never one whose nearest palette colour makes a held-out pair) with colour-free shape and count "
            f"questions{described}."
        )
    if recipe.get("any_shape_scenes"):
        data += (
            f" Also {recipe['any_shape_scenes']} any-shape scenes (palette colours on plus, cross and star shapes, "
            'never named) with colour questions and their colour description ("Describe the colours.").'
        )
    if recipe.get("colour_captions"):
        data += ' Per shape scene also its colour description without shapes ("Describe the colours.").'
    if recipe.get("shape_swap_probability"):
        data += (
            f" In answers, {recipe['shape_swap_probability']:.0%} of the shape words before a colour are replaced "
            "in the input ids (not the labels) by another shape that forms no held-out pair (`ShapeWordSwap`)."
        )
    if recipe.get("foreground_channel"):
        data += (
            " The patch embedding also sees a foreground channel computed from the pixels (each pixel's colour "
            "distance from the image's median colour; `VLMambaVisionConfig.foreground_channel`)."
        )
    if recipe.get("factored_patches"):
        data += (
            " Each patch is embedded as a projection of its foreground map plus a projection of the mean colour "
            "of its foreground pixels, shape and colour apart (`VLMambaVisionConfig.factored_patches`)."
        )
    data += (
        f" The byte-level BPE tokenizer ({summary.get('vocab_size', recipe['vocab_size'])} tokens) is trained on "
        "the recipe's text."
    )
    sources += "\n\n" + data
    if evaluation:
        vqa = evaluation["easy_vqa_test"]
        held, test = evaluation["shapes_heldout_captions"], evaluation["shapes_test_captions"]
        text = (
            "| benchmark | metric | value |\n|---|---|---|\n"
            f"| easy-VQA test ({vqa['n']} questions) | accuracy (VQA-normalised exact match) | {vqa['accuracy']:.2%} |\n"
        )
        for name, res in (("held-out", held), ("test", test)):
            text += (
                f"| shapes {name} captions ({res['n']} scenes) | exact match | {res['exact_match']:.2%} |\n"
                f"| shapes {name} captions | BLEU-4 | {res['bleu4']:.3f} |\n"
                f"| shapes {name} captions | CIDEr-D | {res['cider_d']:.3f} |\n"
            )
        text += (
            "\nHeld-out: scenes that each contain at least one colour-shape pair never seen in the training shape "
            "scenes (compositional generalisation; see Data for easy-VQA). Evaluation code: `vlm-mamba eval` "
            "(`vlm_mamba_hf.training.evaluate`)."
        )
    else:
        text = "Not evaluated."
    return {
        "title": MODEL_NAME,
        "summary": (
            "A tiny attention-free vision-language model that captions simple shape scenes and answers easy-VQA "
            "questions. It is the built-in default model of `vlm-mamba-hf` (`vlm_mamba_hf.DEFAULT_MODEL`), small "
            "enough to ship inside the package and to train on a laptop CPU."
        ),
        "intended_use": (
            'Captions ("Describe the image.") and short answers about 64x64 images of simple coloured shapes '
            "(easy-VQA style, procedural shape scenes); a demonstration and test fixture of the architecture, "
            "not a general-purpose VLM.\n\n"
            "Prompt format (the processor's chat template): `USER: <image>\\n{question} ASSISTANT:`; build it with "
            "`processor.apply_chat_template(messages, add_generation_prompt=True)` or pass chat messages to the "
            "pipeline:\n\n"
            "```python\n"
            "import vlm_mamba_hf\n"
            "from transformers import pipeline\n\n"
            'pipe = pipeline("image-text-to-text", model=vlm_mamba_hf.DEFAULT_MODEL)\n'
            "messages = [\n"
            "    {\n"
            '        "role": "user",\n'
            '        "content": [{"type": "image", "url": "shapes.png"}, {"type": "text", "text": "Describe the image."}],\n'
            "    }\n"
            "]\n"
            "pipe(text=messages, max_new_tokens=48, return_full_text=False)\n"
            "```\n\n"
            'or the command line: `vlm-mamba caption shapes.png`, `vlm-mamba vqa shapes.png "what color is the '
            'shape?"`, `vlm-mamba demo`.'
        ),
        "sources": sources,
        "evaluation": text,
    }


def write_model_card(folder: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """Write README.md (Hub YAML metadata + results) into a checkpoint folder trained by this script."""
    from ..model_card import DEFAULT_LIMITS, card_metadata
    from ..model_card import write_model_card as render_into

    sections = model_card_sections(summary)
    evaluation = summary.get("eval")
    metadata = card_metadata(
        datasets=DATASETS,
        results=_card_results(evaluation) if evaluation else None,
        model_name=MODEL_NAME,
        extra_tags=["image-captioning", "visual-question-answering"],
    )
    limits = DEFAULT_LIMITS + (
        "\n- Knows only the easy-VQA vocabulary and the shape-scene templates; other images and questions "
        "get answers in that vocabulary."
    )
    return render_into(folder, metadata=metadata, limits=limits, repo_id=MODEL_NAME, **sections)


def _switch(parser: argparse.ArgumentParser, option: str, help: str) -> None:
    """An on/off option (`--x` / `--no-x`) that leaves the recipe's value when not given."""
    parser.add_argument(option, action=argparse.BooleanOptionalAction, default=None, help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-mamba train",
        description="Train VLMamba with a recipe (Trainer; works under torchrun and accelerate launch).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--recipe", default="default", help="recipe name: default (built-in model), tiny")
    parser.add_argument("--output-dir", default="runs/vlm-mamba", help="Trainer checkpoints and logs")
    parser.add_argument(
        "--save-dir", default=None, help="final checkpoint folder (default: <output-dir>/final)"
    )
    parser.add_argument("--init-from", default=None, help="start from this checkpoint folder (fine-tuning)")
    parser.add_argument("--resume-from-checkpoint", default=None, help="checkpoint-<step> folder, or 'last'")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument(
        "--time-budget", type=float, default=None, help="stop training after this many seconds"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="per process")
    parser.add_argument("--grad-accum", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument(
        "--vision-lr-scale",
        type=float,
        default=None,
        help="learning rate of the image path (patch/position embedding, bridger) relative to --learning-rate",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--save-steps", type=int, default=None)
    parser.add_argument("--logging-steps", type=int, default=None)
    parser.add_argument("--vision-mode", choices=("fuyu", "encoder"), default=None)
    parser.add_argument("--vision-layers", type=int, default=None)
    parser.add_argument("--text-layers", type=int, default=None)
    parser.add_argument("--text-hidden-size", type=int, default=None)
    parser.add_argument("--vision-hidden-size", type=int, default=None)
    parser.add_argument("--patch-size", type=int, default=None)
    parser.add_argument(
        "--patch-stride", type=int, default=None, help="encoder mode: < patch size for overlapping patches"
    )
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--projector-expansion", type=int, default=None)
    _switch(
        parser,
        "--projector-layernorm",
        "LayerNorm on the patch features before the bridger (the recipe's default: on)",
    )
    _switch(
        parser,
        "--foreground-channel",
        "give the patch embedding a colour-invariant channel: each pixel's distance from the image's median colour",
    )
    _switch(
        parser,
        "--factored-patches",
        "with the foreground channel: embed each patch as a projection of its foreground map plus one of its "
        "foreground's mean colour (VLMambaVisionConfig.factored_patches)",
    )
    parser.add_argument("--state-size", type=int, default=None)
    parser.add_argument("--ssm-layer", choices=("mamba1", "mamba2"), default=None)
    parser.add_argument("--head-dim", type=int, default=None)
    parser.add_argument("--shapes-train-scenes", type=int, default=None)
    parser.add_argument(
        "--any-colour-scenes", type=int, default=None, help="any-colour shape scenes (0: none)"
    )
    _switch(
        parser, "--any-colour-captions", "also train the colour-free description of each any-colour scene"
    )
    parser.add_argument(
        "--any-shape-scenes", type=int, default=None, help="any-shape colour scenes (0: none)"
    )
    _switch(parser, "--colour-captions", "also train the shape-free colour description of each shape scene")
    parser.add_argument(
        "--shape-swap-probability",
        type=float,
        default=None,
        help="ShapeWordSwap input noise: how often a shape word before a colour is replaced (0: off)",
    )
    parser.add_argument("--easy-vqa-limit", type=int, default=None)
    _switch(
        parser,
        "--easy-vqa-exclude-heldout",
        "leave out the easy-VQA images of the shape scenes' held-out colour-shape pairs (default: off)",
    )
    parser.add_argument(
        "--easy-vqa-answer-types",
        nargs="+",
        choices=EASY_VQA_ANSWER_TYPES,
        default=None,
        help="train only on easy-VQA questions with these answer types (default: all)",
    )
    parser.add_argument("--turns", type=int, default=None)
    parser.add_argument(
        "--focus-steps",
        type=int,
        default=None,
        help="steps on easy-VQA questions of the recipe's focus types (shape) alone before the mixture, "
        "within the time budget (default recipe: 500; 0: no focus stage)",
    )
    _switch(
        parser,
        "--focus-scenes",
        "the focus stage also trains the any-colour and any-shape scenes' descriptions and questions",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU: only with native bf16)")
    parser.add_argument(
        "--lora", action="store_true", help="train LoRA adapters (PEFT) instead of all weights"
    )
    parser.add_argument("--fsdp", default=None, help='e.g. "full_shard auto_wrap" (wraps _no_split_modules)')
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    parser.add_argument("--eval-vqa-limit", type=int, default=None, help="evaluate on a subset of questions")
    parser.add_argument("--eval-caption-scenes", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--log-history", default=None, help="write the loss log (JSON) to this file")
    return parser


# Recipe fields whose command-line option has another name.
_OPTION_OF_FIELD = {"time_budget_s": "time_budget"}


def _recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The named recipe with every option given on the command line (options default to None: not given)."""
    overrides = {
        field.name: getattr(args, _OPTION_OF_FIELD.get(field.name, field.name), None)
        for field in dataclasses.fields(Recipe)
        if field.name != "name"  # the recipe's name is args.recipe
    }
    if overrides["easy_vqa_answer_types"]:
        overrides["easy_vqa_answer_types"] = tuple(overrides["easy_vqa_answer_types"])
    return get_recipe(args.recipe, **overrides)


def build_model(recipe: Recipe, processor, init_from: str | None = None) -> VLMambaForConditionalGeneration:
    """A fresh model from the recipe (seeded), or the checkpoint at `init_from`."""
    if init_from:
        return VLMambaForConditionalGeneration.from_pretrained(init_from, dtype=torch.float32)
    set_seed(recipe.seed)
    return VLMambaForConditionalGeneration(build_model_config(recipe, processor.tokenizer))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, save the final checkpoint folder, evaluate; returns a summary dict (also written as JSON)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads or not torch.cuda.is_available():
        world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    recipe = _recipe_from_args(args)
    wall_start = time.perf_counter()

    if args.init_from:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(args.init_from)
    else:
        processor = build_processor(recipe)
    model = build_model(recipe, processor, args.init_from)
    if args.lora:
        from ..lora import apply_lora

        model = apply_lora(model)
        model.print_trainable_parameters()
    train_dataset = build_train_dataset(recipe)
    collator = build_collator(recipe, processor)

    overrides: dict[str, Any] = {"disable_tqdm": args.no_progress}
    if args.gradient_checkpointing:
        overrides["activation_checkpointing"] = True
    if args.bf16:
        if not torch.cuda.is_available() and not cpu_supports_bf16():
            logger.warning(
                "This CPU has no native bf16 arithmetic: bf16 autocast would be slow; training in fp32."
            )
        else:
            overrides["bf16"] = True
    if args.fsdp:
        overrides["fsdp"] = args.fsdp
        overrides["fsdp_config"] = {"transformer_layer_cls_to_wrap": list(model._no_split_modules)}
    training_args = training_arguments(recipe, args.output_dir, **overrides)
    for_focus = recipe
    if recipe.focus_steps and args.resume_from_checkpoint:
        logger.info("Resuming: the focus stage is skipped (the checkpoint already holds its result).")
        for_focus = recipe.replace(focus_steps=0)
    elif recipe.focus_steps and args.fsdp:
        logger.warning("--fsdp: the focus stage is skipped (pass --focus-steps 0 to silence this).")
        for_focus = recipe.replace(focus_steps=0)
    focus = run_focus_stage(for_focus, model, collator, args.output_dir, **overrides)
    budget = mixture_time_budget(recipe, focus)
    callbacks = [budget] if budget is not None else []
    trainer = VLMambaTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        callbacks=callbacks,
        processing_class=processor,
        vision_lr_scale=recipe.vision_lr_scale,
    )
    resume = args.resume_from_checkpoint
    if resume == "last":
        resume = True
    train_start = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - train_start
    steps = trainer.state.global_step
    world = training_args.world_size
    examples_seen = steps * recipe.batch_size * recipe.grad_accum * world
    summary: dict[str, Any] = {
        "recipe": recipe.to_dict(),
        "train_loss": train_output.training_loss,
        "final_logged_loss": next(
            (h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), math.nan
        ),
        "steps": steps,
        "world_size": world,
        "train_seconds": train_seconds,
        "examples_per_second": examples_seen / train_seconds if train_seconds else math.nan,
        "stopped_by_time_budget": bool(budget and budget.stopped_at_step is not None),
        "collator_stats": dict(collator.stats),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(processor.tokenizer),
        "machine": _machine(),
        "train_examples": len(train_dataset),
        "focus_stage": focus,
    }
    logger.info("Collator: %s", collator.stats)
    if args.log_history and trainer.is_world_process_zero():
        Path(args.log_history).write_text(json.dumps(trainer.state.log_history, indent=1))
    if not trainer.is_world_process_zero():
        return summary

    save_dir = Path(args.save_dir or Path(args.output_dir) / "final")
    final_model = model.merge_and_unload() if args.lora else model
    final_model.generation_config = default_generation_config(processor.tokenizer)
    final_model.save_pretrained(save_dir)
    processor.save_pretrained(save_dir)
    (save_dir / "training_recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))
    if not args.no_eval:
        from .evaluate import evaluate_all, summary_line

        eval_start = time.perf_counter()
        results = evaluate_all(
            final_model,
            processor,
            vqa_limit=recipe.eval_vqa_limit,
            caption_scenes=recipe.eval_caption_scenes,
            scene_size=recipe.scene_size,
            progress=not args.no_progress,
        )
        summary["eval"] = results
        summary["eval_seconds"] = time.perf_counter() - eval_start
        logger.info("Evaluation: %s", summary_line(results))
    summary["wall_seconds"] = time.perf_counter() - wall_start
    (save_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
    write_model_card(save_dir, summary)
    logger.info("Saved the final checkpoint to %s (%.0f s in all).", save_dir, summary["wall_seconds"])
    return summary


if __name__ == "__main__":
    main()
