"""Sample text from a trained checkpoint: ``python -m mmrec.recipes.generate``.

    python -m mmrec.recipes.generate --checkpoint runs/tiny --prompt "The "
    python -m mmrec.recipes.generate --checkpoint runs/tiny --prompt-file doc.txt --save-state doc.state
    python -m mmrec.recipes.generate --checkpoint runs/tiny --load-state doc.state --prompt "Next, "

Each new token is one step of the model carrying its state, so it costs the same at any
context length. ``--save-state`` keeps the state after the prompt, so a long document is
read once and continued later with ``--load-state``. Its folder must exist, and an
existing file is replaced only with ``--overwrite``; both are checked before the model is
loaded. Every problem with the arguments, the checkpoint, the prompt or a state file ends
the command with one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import mmrec
from mmrec.checkpoint import CheckpointError, load_checkpoint
from mmrec.generate import check_prompt, check_sampling_options
from mmrec.recipes import RecipeError
from mmrec.state import StateError, check_writable
from mmrec.tokenizer import TokenizerError, load_tokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mmrec.recipes.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run folder (its newest checkpoint) or a checkpoint folder")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text to continue")
    prompt.add_argument("--prompt-file", type=Path, help="a UTF-8 file whose text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely token")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int)
    p.add_argument("--load-state", type=Path, help="a state saved with --save-state: the prompt continues it")
    p.add_argument("--save-state", type=Path, help="save the state after the prompt (safetensors); its folder must exist")
    p.add_argument("--overwrite", action="store_true", help="let --save-state replace an existing file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="weights and activations; auto = bfloat16 on CUDA, float32 on CPU")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--eager", action="store_true", help="no static step / CUDA graph: one Python step per token")
    mode.add_argument("--compile", action="store_true",
                      help="the static step, torch.compile'd (slower start, faster tokens; also on CPU)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """What can be checked before loading anything, so that a bad option fails at once."""
    check_sampling_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    if args.overwrite and not args.save_state:
        raise ValueError("--overwrite applies to --save-state, which is not given")
    if args.save_state:
        check_writable(args.save_state)
        if args.save_state.exists() and not args.overwrite:
            raise StateError(f"state file {str(args.save_state)!r} already exists; pass --overwrite to replace it, "
                             "or give --save-state another name")
    if args.load_state and not args.load_state.is_file():
        what = "is a folder, not a state file" if args.load_state.is_dir() else "does not exist"
        raise StateError(f"--load-state {str(args.load_state)!r} {what}")
    if args.prompt_file and not args.prompt_file.is_file():
        what = "is a folder" if args.prompt_file.is_dir() else "does not exist"
        raise ValueError(f"--prompt-file {str(args.prompt_file)!r} {what}")


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    try:
        return args.prompt_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"--prompt-file {str(args.prompt_file)!r} is not UTF-8 text ({error.reason} at byte {error.start})") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        text = read_prompt(args)
        checkpoint = load_checkpoint(args.checkpoint)
        model = mmrec.build(str(checkpoint.recipe_file))
        checkpoint.load_model(model)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
            args.dtype, torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32)
        model = model.to(device=args.device, dtype=dtype).eval()
        tokenizer = load_tokenizer(checkpoint.tokenizer, checkpoint.path)
        ids = torch.tensor(tokenizer.encode(text), dtype=torch.long, device=args.device)[None]
        if ids.shape[1] == 0:
            raise ValueError("the prompt is empty")
        check_prompt(ids, model.config.vocab_size)  # before the model sees it: a tokenizer of another vocabulary
        state = mmrec.State.load(args.load_state, model, device=args.device) if args.load_state else None
        if args.save_state:
            replaced = args.save_state.exists()
            with torch.no_grad():
                saved = model(ids, state=state).state
            saved.save(args.save_state, overwrite=args.overwrite)
            print(f"saved the state after {saved.position} tokens to {args.save_state}"
                  + (" (replacing the file that was there)" if replaced else ""), file=sys.stderr)
        out = mmrec.generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                             state=state, cuda_graph=False if args.eager else (True if args.compile else None),
                             compile=args.compile)
    except (CheckpointError, RecipeError, StateError, TokenizerError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text + tokenizer.decode(out[0, ids.shape[1]:].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
