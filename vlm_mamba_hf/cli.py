"""The `vlm-mamba` command: caption images, answer questions, run the demo, train and evaluate.

    vlm-mamba caption photo.png other.png          # "Describe the image." with the built-in model
    vlm-mamba vqa photo.png "what color is the shape?"
    vlm-mamba demo                                 # bundled sample images, captions and questions
    vlm-mamba train --recipe default               # train the default model (see `vlm-mamba train --help`)
    vlm-mamba eval --model runs/x/final            # easy-VQA accuracy and shape-caption metrics
    vlm-mamba export-remote-code SRC OUT           # checkpoint + model code for trust_remote_code=True

`--model` takes any checkpoint folder (default: the built-in model shipped in the package), `--device`
cpu / cuda / auto and `--dtype` float32 / bfloat16 / float16 / auto.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
CAPTION_PROMPT = "Describe the image."

_DELEGATED = {
    "train": "train a model with a recipe (all options: vlm-mamba train --help)",
    "eval": "evaluate a checkpoint on easy-VQA and shape captions (options: vlm-mamba eval --help)",
}


def _default_model() -> str:
    from .training.evaluate import default_model_path

    return default_model_path()


def load_model(model: str | None = None, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """(model, processor) from a checkpoint folder (default: the built-in model), in eval mode."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = model or _default_model()
    if not Path(path).is_dir():
        raise SystemExit(
            f"vlm-mamba: no checkpoint folder at {path!r}. Pass --model with a checkpoint folder."
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    loaded = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    return loaded, AutoProcessor.from_pretrained(path)


def _answers(model, processor, images: list, questions: list[str], args: argparse.Namespace) -> list[str]:
    from .training.evaluate import generate_answers

    return generate_answers(
        model,
        processor,
        images,
        questions,
        max_new_tokens=args.max_new_tokens,
        image_contrast=args.image_contrast,
    )


def _open_images(paths: Sequence[str]) -> list:
    from .image_processing_vlm_mamba import load_image_file

    images = []
    for path in paths:
        try:
            images.append(load_image_file(path))
        except (OSError, ValueError) as error:
            raise SystemExit(f"vlm-mamba: cannot read image {path!r}: {error}") from error
    return images


def cmd_caption(args: argparse.Namespace) -> int:
    model, processor = load_model(args.model, args.device, args.dtype)
    images = _open_images(args.images)
    captions = _answers(model, processor, images, [args.prompt] * len(images), args)
    for path, caption in zip(args.images, captions):
        print(f"{path}: {caption}")
    return 0


def cmd_vqa(args: argparse.Namespace) -> int:
    model, processor = load_model(args.model, args.device, args.dtype)
    image = _open_images([args.image])[0]
    answers = _answers(model, processor, [image] * len(args.questions), args.questions, args)
    for question, answer in zip(args.questions, answers):
        print(f"Q: {question}\nA: {answer}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .metrics import normalize_vqa_answer

    model, processor = load_model(args.model, args.device, args.dtype)
    samples = json.loads((ASSETS_DIR / "samples.json").read_text())
    correct = total = 0
    for sample in samples:
        image = _open_images([str(ASSETS_DIR / sample["file"])])[0]
        questions = [CAPTION_PROMPT] if sample.get("caption") else []
        questions += [qa["question"] for qa in sample.get("questions", [])]
        expected = ([sample["caption"]] if sample.get("caption") else []) + [
            qa["answer"] for qa in sample.get("questions", [])
        ]
        answers = _answers(model, processor, [image] * len(questions), questions, args)
        print(f"\n{sample['file']} ({sample['source']})")
        for question, answer, reference in zip(questions, answers, expected):
            ok = normalize_vqa_answer(answer) == normalize_vqa_answer(reference)
            correct += ok
            total += 1
            mark = "ok" if ok else f"expected: {reference}"
            print(f"  {question}\n    -> {answer}   [{mark}]")
    print(f"\n{correct}/{total} answers match the references.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-mamba",
        description="VLMamba, an attention-free vision-language model: captioning, VQA, training, evaluation.",
        epilog="Examples:\n  vlm-mamba demo\n  vlm-mamba caption image.png\n"
        '  vlm-mamba vqa image.png "what color is the shape?"\n  vlm-mamba train --recipe default\n'
        "  vlm-mamba eval --model runs/vlm-mamba/final",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None, help="checkpoint folder (default: the built-in model)")
    common.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (default: auto)")
    common.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)",
    )
    common.add_argument("--max-new-tokens", type=int, default=48, help="longest answer (default: 48)")
    common.add_argument(
        "--image-contrast",
        type=float,
        default=None,
        metavar="ALPHA",
        help="image-contrastive decoding at ALPHA, e.g. 1.0: weighs each word by how much more likely the image "
        "makes it than a blank image does (0: plain greedy; default: the checkpoint's generation config)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    caption = sub.add_parser("caption", parents=[common], help="describe one or more images")
    caption.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    caption.add_argument("--prompt", default=CAPTION_PROMPT, help=f'prompt (default: "{CAPTION_PROMPT}")')
    caption.set_defaults(func=cmd_caption)

    vqa = sub.add_parser("vqa", parents=[common], help="answer questions about an image")
    vqa.add_argument("image", metavar="IMAGE", help="image file")
    vqa.add_argument("questions", nargs="+", metavar="QUESTION", help="one or more questions")
    vqa.set_defaults(func=cmd_vqa)

    demo = sub.add_parser("demo", parents=[common], help="captions and answers on the bundled sample images")
    demo.set_defaults(func=cmd_demo)

    export = sub.add_parser(
        "export-remote-code",
        help="copy a checkpoint folder and add the model code + auto_map for trust_remote_code=True loading",
    )
    export.add_argument("src", metavar="SRC_FOLDER", help="a VLMamba checkpoint folder (left untouched)")
    export.add_argument("out", metavar="OUT_FOLDER", help="the folder to write (must not exist or be empty)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_FOLDER")
    export.set_defaults(func=cmd_export_remote_code)

    for name, text in _DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def cmd_export_remote_code(args: argparse.Namespace) -> int:
    from .remote_code import export_remote_code

    try:
        out = export_remote_code(args.src, args.out, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"vlm-mamba export-remote-code: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}: load it with trust_remote_code=True, or push it with huggingface_hub")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vlm-mamba` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from .training.train import main as train_main

        train_main(argv[1:])
        return 0
    if argv and argv[0] == "eval":
        from .training.evaluate import main as eval_main

        eval_main(argv[1:])
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
