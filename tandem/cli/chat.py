"""Terminal front ends over the runtime's LLM API: the chat loop and one-shot generate."""

import argparse
import os
import sys

from tandem.cli.main import check_model_options, read_text_file, sampling_kwargs
from tandem.errors import TandemError
from tandem.runtime.llm import LLM, Generation

HELP = "commands: /clear (forget the conversation), /exit (quit)"


def open_model(args: argparse.Namespace, path) -> LLM:
    check_model_options(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return LLM(
            path,
            dtype=args.dtype,
            device=args.device,
            max_context=args.max_context,
            progress=sys.stderr.isatty(),
            config_dir=args.config_dir,
            experts=args.experts,
            experts_format=args.experts_format,
            cpu_threads=args.cpu_threads,
            max_batch=args.max_batch,
            max_step_tokens=args.max_step_tokens,
            cpu_moe=args.cpu_moe,
            n_cpu_moe_layers=args.n_cpu_moe_layers,
            placement=args.placement,
            vram_budget=args.vram_budget,
            ram_budget=args.ram_budget,
            cuda_graph=args.cuda_graph,
            look_ahead=args.look_ahead,
            dual_prefill=args.dual_prefill,
            gpu_experts=args.gpu_experts,
            calibrate=args.calibrate,
            kv_cache=args.kv_cache,
        )
    except TandemError as e:
        plan = getattr(e, "plan", None)  # placement.advice.DoesNotFit carries the memory plan
        if plan is not None and not sys.stderr.isatty():  # on a terminal LLM has shown it already
            from tandem.placement.memory import format_plan

            print(format_plan(plan), file=sys.stderr)
        raise


def stats_line(g: Generation) -> str:
    """One line after each answer. TTFT is prompt in -> first token out, so prefill tok/s = prompt / TTFT."""
    return (
        f"[prefill {len(g.prompt_token_ids)} tok, TTFT {_ms(g.prefill_seconds)}, {g.prefill_tok_s:.1f} tok/s | "
        f"decode {len(g.token_ids)} tok, {g.decode_tok_s:.1f} tok/s | {g.finish_reason}]"
    )


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.{2 if ms < 10 else 1 if ms < 100 else 0}f} ms"  # three significant digits or more


def dimmed(text: str, stream) -> str:
    """Faint on a terminal (unless NO_COLOR is set), so the stats stand apart from the answer; plain in pipes."""
    if getattr(stream, "isatty", lambda: False)() and not os.environ.get("NO_COLOR"):
        return f"\033[2m{text}\033[0m"
    return text


def stream_to(out, llm: LLM, prompt, sampling: dict) -> Generation:
    stream = llm.stream(prompt, **sampling)
    for piece in stream:
        out.write(piece)
        out.flush()
    return stream.result


def run_chat(args: argparse.Namespace) -> int:
    path = args.model
    if path is None:
        from tandem.runtime.demo import demo_model_dir

        path = demo_model_dir()
        print(
            "no model given: chatting with the built-in demo model (a 10M-parameter DeepSeek-V3-style MoE "
            "trained on Python's standard library; ask it what a stdlib function does)",
            file=sys.stderr,
        )
    sampling = sampling_kwargs(args)
    first = read_text_file(args.prompt_file) if args.prompt_file else None  # checked before the model loads
    if first is not None and not first.strip():
        raise TandemError(f"the prompt file {args.prompt_file!r} is empty: it is sent as the first message")
    llm = open_model(args, path)
    llm.sampling_params(**sampling)  # reject bad sampling flags before the first prompt
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    pending = first
    interactive = sys.stdin.isatty()
    print(f"tandem chat: {path} ({HELP})", file=sys.stderr)
    while True:
        if pending is not None:
            text, pending = pending, None
        else:
            if interactive:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                return 0
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return 0
            if text == "/clear":
                history.clear()
                print("(conversation cleared)", file=sys.stderr)
                continue
        messages = system + history + [{"role": "user", "content": text}]
        try:
            result = stream_to(sys.stdout, llm, messages, sampling)
        except TandemError as e:  # e.g. the conversation outgrew the context: keep the session
            print(f"error: {e}", file=sys.stderr)
            continue
        print()
        print(dimmed(stats_line(result), sys.stdout), flush=True)
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": result.text}]
        moved = llm.rebalance_hot_experts()  # while the user types: follow where routing went
        if moved:
            print(dimmed(f"(hot experts re-placed in {len(moved)} layer(s))", sys.stdout), flush=True)


def run_generate(args: argparse.Namespace) -> int:
    text = args.prompt if args.prompt is not None else read_text_file(args.prompt_file)
    if not text.strip():
        raise TandemError("the prompt is empty: give some text with --prompt or --prompt-file")
    llm = open_model(args, args.model)
    prompt = [{"role": "user", "content": text}] if args.chat else text
    result = stream_to(sys.stdout, llm, prompt, sampling_kwargs(args))
    print()
    print(dimmed(stats_line(result), sys.stderr), file=sys.stderr)
    return 0
