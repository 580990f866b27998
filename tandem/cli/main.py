"""`tandem chat | generate | inspect | serve | eval | convert | bench`: parse arguments, call the runtime, print.

User errors (TandemError) print one line and exit with status 2, without a traceback.
"""

import argparse
import os
import sys

from tandem.cli.args import check_path, check_threads, hot_count, step_tokens
from tandem.cli.bench import add_bench_parser, add_convert_parser
from tandem.errors import NaNLogits, TandemError


MODEL_HELP = "HF model directory, or a GGUF model (.gguf file, any part of a split one, or a folder of parts)"


def add_config_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-dir", help="for GGUF models: take config.json and the tokenizer from this HF directory")


def add_model_options(p: argparse.ArgumentParser) -> None:
    add_config_dir(p)
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (default: auto)")
    p.add_argument("--device", default="cpu", help="torch device for the non-expert layers (default: cpu)")
    p.add_argument("--max-context", type=int, default=None, help="context window in tokens (default: model's, at most 8192)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--experts", default="cpu", choices=("cpu", "torch"),
                   help="routed experts backend: cpu = the C++ engine (default), torch = plain torch (reference)")
    p.add_argument("--experts-format", default="bf16", choices=("bf16", "int8", "int4"),
                   help="what float-checkpoint experts become in the CPU engine (GGUF experts keep their blocks)")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="CPU expert engine threads (default: the cores this process may use; with a GPU, all but two)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="sequences run at once; the KV cache holds max-batch x max-context tokens (default: 8)")
    p.add_argument("--max-step-tokens", type=step_tokens, default="auto", metavar="N|auto",
                   help="tokens one continuous-batching step feeds the model: a decode token per running "
                        "sequence, the rest on prompt chunks, so longer prompts prefill over several steps "
                        "(auto, the default: the largest of 8192 / 4096 / 2048 / 1024 / 512 whose workspace fits the "
                        "memory budget; smaller chunks delay other users' tokens less, larger ones prefill "
                        "long prompts faster)")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="run every decode step eagerly instead of replaying a CUDA graph per batch size")
    p.add_argument("--no-look-ahead", dest="look_ahead", action="store_false",
                   help="wait for each decode step's tokens on the host before queuing the next step (by default, "
                        "with CUDA graphs, the next step is queued first and the host's work overlaps it)")
    p.add_argument("--no-dual-prefill", dest="dual_prefill", action="store_false",
                   help="keep long prefill steps' routed experts on the CPU engine alone (by default, with a GPU, "
                        "each layer's experts are split between the engine and the GPU, which copies its share; the split "
                        "follows measured times, so greedy output may differ from run to run with it)")
    p.add_argument("--kv-cache", default="auto", choices=("auto", "int8"),
                   help="KV cache format: auto = the model's dtype; int8 = int8 codes with a scale per 64 "
                        "values, about half the memory of bf16 (MLA models: DeepSeek-V2/V3/R1)")
    # Placement (tandem.placement): routed experts in CPU RAM, the rest on --device; see the plan table.
    p.add_argument("--cpu-moe", action="store_true",
                   help="all routed experts in the CPU engine, everything else on --device (the default)")
    p.add_argument("--n-cpu-moe-layers", type=int, default=None, metavar="N",
                   help="routed experts of the first N MoE layers in the CPU engine, the rest on --device")
    p.add_argument("--placement", metavar="FILE",
                   help="placement rules tried first: 'REGEX = cpu-engine|gpu|cpu' per line, or a JSON list")
    p.add_argument("--gpu-experts", type=hot_count, default=0, metavar="N|auto",
                   help="per MoE layer, a copy of the N most-routed experts on --device (auto: as many as the "
                        "VRAM budget leaves room for); routing statistics come from --calibrate")
    p.add_argument("--calibrate", metavar="FILE",
                   help="text whose routing picks the --gpu-experts (default: a built-in mix of prose and code)")
    p.add_argument("--vram-budget", type=float, default=None, metavar="GB",
                   help="VRAM the memory plan may use (default: the device's free memory)")
    p.add_argument("--ram-budget", type=float, default=None, metavar="GB",
                   help="RAM the memory plan may use (default: MemAvailable)")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most (default: 256)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: model's generation_config, else 0)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


MAX_BUDGET_GB = 1e6  # a petabyte: more is a typo (and inf or 1e308 GB overflow a byte count)


def check_model_options(args: argparse.Namespace) -> None:
    """Refuse bad engine sizes before loading (which may take minutes); the runtime checks them again."""
    from tandem.placement.rules import check_device

    check_path("model path", args.model)
    check_path("--config-dir", args.config_dir)
    check_device(args.device)
    check_threads("--threads", args.threads)
    if args.max_step_tokens != "auto" and args.max_step_tokens < 1:
        raise TandemError(f"--max-step-tokens must be >= 1 or auto, got {args.max_step_tokens}: it is the number "
                          "of tokens one step may feed the model")
    for flag, gb in (("--vram-budget", args.vram_budget), ("--ram-budget", args.ram_budget)):
        if gb is not None and not 0 < gb <= MAX_BUDGET_GB:
            raise TandemError(f"{flag} must be a positive number of GB, at most {MAX_BUDGET_GB:g}, got {gb}")
    if args.calibrate is not None:
        if not args.gpu_experts:
            raise TandemError("--calibrate chooses which experts --gpu-experts keeps on the GPU: give --gpu-experts "
                              "N or auto too (alone it would change nothing)")
        read_text_file(args.calibrate, "--calibrate file")  # readable UTF-8, before the model loads


def sampling_kwargs(args: argparse.Namespace) -> dict:
    names = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
    kw = {n: getattr(args, n) for n in names}
    kw["stop"] = tuple(args.stop) if args.stop else None
    return kw


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Run Mixture-of-Experts LLMs on one machine.")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="interactive multi-turn chat (built-in demo model when no MODEL is given)")
    chat.add_argument("model", nargs="?", help=MODEL_HELP)
    chat.add_argument("--prompt-file", help="send this file's text as the first message")
    chat.add_argument("--system", help="system prompt")
    add_model_options(chat)
    add_sampling_options(chat)

    gen = sub.add_parser("generate", help="generate from one prompt and exit")
    gen.add_argument("model", help=MODEL_HELP)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_model_options(gen)
    add_sampling_options(gen)

    ins = sub.add_parser("inspect", help="architecture, parameters, dtypes and bytes of a model (loads nothing)")
    ins.add_argument("model", help=MODEL_HELP)
    add_config_dir(ins)
    add_serve_parser(sub)
    from tandem.cli.evaluate import add_eval_parser  # here, not at import: evaluate imports this module

    add_eval_parser(sub)
    add_convert_parser(sub)
    add_bench_parser(sub)
    return parser


def add_serve_parser(sub) -> None:
    srv = sub.add_parser("serve", help="OpenAI- and Ollama-compatible HTTP server with a web chat page")
    srv.add_argument("model", nargs="?", help=MODEL_HELP + " (default: the built-in demo model)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health and the page")
    srv.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                     help="largest request body (default: 4 MiB)")
    srv.add_argument("--max-queue", type=int, default=64,
                     help="most requests waiting for their first token; more get HTTP 429 with Retry-After (default: 64)")
    srv.add_argument("--model-name", help="the model name clients use (default: the model directory's name)")
    srv.add_argument("--allow-origin", action="append", default=None,
                     help="a web origin (http://host:port) whose pages may call the API, besides the server's own page")
    add_model_options(srv)


def run_serve(args: argparse.Namespace) -> int:
    from tandem.cli.chat import open_model
    from tandem.serve.app import bind, run_server
    from tandem.serve.settings import ServeSettings

    settings = ServeSettings(host=args.host, port=args.port, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                             max_queue=args.max_queue, model_name=args.model_name, allowed_origins=tuple(args.allow_origin or ()))
    sock = bind(settings)  # a busy port fails before minutes of loading
    path = args.model
    if path is None:
        from tandem.runtime.demo import demo_model_dir

        path = demo_model_dir()
        print(f"no model given: serving the built-in demo model at {path}", file=sys.stderr)
    return run_server(open_model(args, path), settings, sock)


def read_text_file(path: str, what: str = "prompt file") -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise TandemError(f"cannot read {what} {path!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise TandemError(f"{what} {path!r} is not UTF-8 text") from None


def run_command(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        from tandem.runtime.inspect import describe, format_description

        check_path("model path", args.model)
        check_path("--config-dir", args.config_dir)
        print(format_description(describe(args.model, args.config_dir)))
        return 0
    if args.command == "serve":
        return run_serve(args)
    if args.command in ("bench", "convert"):
        from tandem.cli.bench import run_bench, run_convert

        return run_bench(args) if args.command == "bench" else run_convert(args)
    if args.command == "eval":
        from tandem.cli.evaluate import run_eval

        return run_eval(args)
    from tandem.cli import chat

    if args.command == "chat":
        return chat.run_chat(args)
    return chat.run_generate(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = run_command(args)
        sys.stdout.flush()  # a reader that left shows here, not as a second error at exit
        return status
    except (TandemError, NaNLogits) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tandem generate ... | head`: the reader left, as with any Unix filter
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 141  # 128 + SIGPIPE, what a shell reports for a filter the pipe stopped


if __name__ == "__main__":
    sys.exit(main())
