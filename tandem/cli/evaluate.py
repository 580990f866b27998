"""`tandem eval ppl | compare`: perplexity of a model, and a quality table across weight formats
and fewer active experts (each row loads the model its own way and scores the same tokens)."""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tandem.cli.args import check_output, check_path
from tandem.cli.main import read_text_file
from tandem.errors import TandemError
from tandem.runtime.demo import demo_model_dir
from tandem.runtime.evaluate import perplexity, quality_variants, set_experts_per_token
from tandem.runtime.llm import LLM
from tandem.runtime.loader import read_config


def add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="measure quality: perplexity, or a table across weight formats")
    kinds = ev.add_subparsers(dest="eval_command", required=True)
    for name, help_ in (("ppl", "perplexity on a text"), ("compare", "perplexity across formats and expert counts")):
        p = kinds.add_parser(name, help=help_)
        p.add_argument("model", nargs="?", help="model (default: the built-in demo model)")
        p.add_argument("--text", help="UTF-8 text file (default: the model's heldout.txt, as the demo ships)")
        p.add_argument("--window", type=int, default=512, help="tokens per scored window (default 512)")
        p.add_argument("--stride", type=int, default=None, help="tokens between windows (default window/2)")
        p.add_argument("--max-tokens", type=int, default=16384 if name == "compare" else None,
                       help="score only the text's first N tokens" + (" (default 16384)" if name == "compare" else ""))
        if name == "compare":
            p.add_argument("--json", help="also write the table as JSON to this file")
        else:
            p.add_argument("--dtype", default="auto")


def load_text(args: argparse.Namespace, model: Path) -> str:
    if args.text:
        return read_text_file(args.text, "text file")
    if not model.exists():
        raise TandemError(f"model path {str(model)!r} does not exist")
    default = model / "heldout.txt" if model.is_dir() else None
    if default is None or not default.is_file():
        raise TandemError(f"{model} ships no heldout.txt: give a text file with --text")
    return default.read_text(encoding="utf-8")


def tokens_of(llm: LLM, text: str, max_tokens: int | None) -> list[int]:
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    return ids[:max_tokens] if max_tokens else ids


def check_eval_options(args: argparse.Namespace) -> None:
    check_path("model path", args.model)
    check_path("--text", args.text)
    if args.window < 2:
        raise TandemError(f"--window must be >= 2 tokens, got {args.window}")
    if args.stride is not None and not 1 <= args.stride <= args.window:
        raise TandemError(f"--stride must be in 1..--window ({args.window}), got {args.stride}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise TandemError(f"--max-tokens must be >= 2 (perplexity scores each token after the first), "
                          f"got {args.max_tokens}")
    check_output("--json", getattr(args, "json", None))


def run_eval(args: argparse.Namespace) -> int:
    check_eval_options(args)
    model = Path(args.model) if args.model else demo_model_dir()
    text = load_text(args, model)
    progress = sys.stderr.isatty()
    if args.eval_command == "ppl":
        llm = LLM(model, dtype=args.dtype, max_context=args.window, progress=progress)
        r = perplexity(llm.engine, tokens_of(llm, text, args.max_tokens), args.window, args.stride, progress)
        print(f"perplexity {r.ppl:.4f} over {r.tokens} tokens (window {args.window})")
        return 0
    return run_compare(args, model, text, progress)


def run_compare(args: argparse.Namespace, model: Path, text: str, progress: bool) -> int:
    from tandem.testing.tiny_gguf import write_gguf  # the converter also used to build test GGUFs

    if not (model / "config.json").is_file():
        raise TandemError("eval compare converts from an HF model directory; give one (GGUF input is not supported)")
    top_k = read_config(model).get("num_experts_per_tok")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise TandemError(f"{model / 'config.json'}: num_experts_per_tok is {top_k!r}; eval compare needs an MoE "
                          "model whose config gives its experts per token (an integer >= 1)")
    rows, ids, base = [], None, None
    with tempfile.TemporaryDirectory(prefix="tandem-eval-") as tmp:
        for variant in quality_variants(top_k=top_k):
            path = model if variant.weights == "model" else write_gguf(model, Path(tmp) / f"{variant.weights}.gguf", variant.weights)
            llm = LLM(path, max_context=args.window, progress=False, **variant.llm)
            if variant.experts_per_token:
                set_experts_per_token(llm.model, variant.experts_per_token)
            ids = ids or tokens_of(llm, text, args.max_tokens)
            r = perplexity(llm.engine, ids, args.window, args.stride, progress)
            base = base or r.ppl
            rows.append({"variant": variant.name, "ppl": r.ppl, "vs_baseline_pct": 100 * (r.ppl / base - 1), "tokens": r.tokens})
            if progress:
                print(f"  {variant.name:<28} ppl {r.ppl:9.4f}  {rows[-1]['vs_baseline_pct']:+7.2f}%", file=sys.stderr)
            del llm
    print(f"{'variant':<28} {'perplexity':>11} {'vs baseline':>12}")
    for row in rows:
        print(f"{row['variant']:<28} {row['ppl']:>11.4f} {row['vs_baseline_pct']:>+11.2f}%")
    print(f"({rows[0]['tokens']} tokens scored, window {args.window}, model {model})")
    if args.json:
        try:
            Path(args.json).write_text(json.dumps({"model": str(model), "window": args.window, "rows": rows}, indent=2))
        except OSError as e:  # checked before scoring; this is the disk filling up or the folder going away
            raise TandemError(f"cannot write --json {args.json!r}: {e.strerror}") from None
    return 0
