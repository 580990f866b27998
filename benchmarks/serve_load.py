"""Serving load: time to first token, inter-token latency and aggregate tok/s of `tandem serve` under
concurrent streams, on loopback.

Starts `tandem serve` on a free 127.0.0.1 port (the built-in demo model unless --server-args names a
model), or measures a running server at --url. For each --concurrency level C it keeps C streams busy
with greedy /v1/chat/completions requests (streamed, distinct prompts of about --prompt-tokens
tokens, --max-tokens each, `ignore_eos` so every answer has that length) until --requests have been
sent or --time-limit seconds have passed; requests in flight then run to their end.

Per level: requests ok / failed, aggregate output tok/s (completion tokens of the ok requests over
the level's wall time), TTFT (request sent -> first chunk with text) and inter-token latency (the
gaps between text chunks; a chunk may carry more than one token when text is held back) at
p50 / p90 / p99, and aggregate tok/s relative to concurrency 1. The table comes last; --json
writes everything. Two calibration requests first (also the warm-up) size the prompts from the
server's own token counts.

    python benchmarks/serve_load.py                                     # demo model, < 2 minutes
    python benchmarks/serve_load.py --server-args "/models/v2-lite.gguf --device cuda" \\
        --concurrency 1,4,16 --json serve_load.json
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --concurrency 1,8

Needs only the standard library, httpx and serve_process.py (the server it starts) from this
repository; it talks HTTP only, so it also measures other OpenAI-compatible servers at --url.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.serve_process import LoadError, Server, redacted  # noqa: E402

# Short common words: about one token each in most BPE vocabularies, so the calibration is linear.
_WORD_TEXT = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had "
    "by word but not what all were we when your can said there use an each which she do how their if will "
    "up other about out many then them these so some her would make like him into time has look two more "
    "write go see number no way could people my than first water been call who its now find long down day "
    "did get come made may part over new sound take only little work know place year live me back give "
    "most very after thing our just name good sentence man think say great where help through much before "
    "line right too mean old any same tell boy follow came want show also around form three small set put "
    "end does another well large must big even such because turn here why ask went men read need land "
    "different home us move try kind hand picture again change off play spell air away animal house point "
    "page letter mother answer found study still learn should world"
)
WORDS = tuple(_WORD_TEXT.split())
SERVER_FLAGS_WE_SET = ("--host", "--port")
CALIBRATION_WORDS = 8


@dataclass(frozen=True)
class LoadConfig:
    url: str | None = None  # a running server; None = start `tandem serve` with server_args
    server_args: tuple[str, ...] = ()
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests: int | None = None  # per level; None = 4 x concurrency, at least 8
    time_limit: float = 25.0  # per level: no new requests after this many seconds
    max_tokens: int = 64
    prompt_tokens: int = 128
    ignore_eos: bool = True
    api_key: str | None = None
    startup_timeout: float = 900.0  # loading a large model takes minutes
    request_timeout: float = 600.0  # longest wait for the next bytes of one response
    seed: int = 0
    json_path: str | None = None

    def __post_init__(self) -> None:
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise LoadError(f"--concurrency {','.join(map(str, self.concurrency))}: give levels >= 1, e.g. 1,4,16")
        if self.requests is not None and self.requests < max(self.concurrency):
            raise LoadError(f"--requests {self.requests} is fewer than --concurrency {max(self.concurrency)}: "
                            "a level must send at least as many requests as it runs at once")
        for name, value in (("--max-tokens", self.max_tokens), ("--prompt-tokens", self.prompt_tokens)):
            if value < 1:
                raise LoadError(f"{name} must be >= 1, got {value}")
        for name, value in (("--time-limit", self.time_limit), ("--startup-timeout", self.startup_timeout),
                            ("--request-timeout", self.request_timeout)):
            if not value > 0:
                raise LoadError(f"{name} must be > 0 seconds, got {value}")
        if self.url is not None:
            if self.server_args:
                raise LoadError("--server-args only applies when this script starts the server: leave out --url")
            parts = urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise LoadError(f"--url {self.url!r} must look like http://host:port")
        for arg in self.server_args:
            if arg.split("=")[0] in SERVER_FLAGS_WE_SET:
                raise LoadError(f"--server-args must not set {arg.split('=')[0]}: this script serves on a free "
                                "loopback port; to measure a server of your own, start it and pass --url")

    def level_requests(self, concurrency: int) -> int:
        return self.requests if self.requests is not None else max(8, 4 * concurrency)


# --- one request --------------------------------------------------------------------------------


@dataclass
class Result:
    ok: bool
    error: str | None = None
    ttft: float | None = None  # seconds from send to the first chunk with text
    gaps: list[float] = field(default_factory=list)  # seconds between text chunks
    prompt_tokens: int | None = None
    output_tokens: int = 0
    end: float = 0.0  # perf_counter when the response ended


async def one_request(client: httpx.AsyncClient, body: dict) -> Result:
    """Send one streamed chat request; time its chunks. Never raises for a failed request."""
    start = time.perf_counter()
    last = None
    result = Result(ok=False)
    chunks, done, finished = 0, False, False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {_error_message(await r.aread())}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"error event: {_error_message(data.encode())}"
                    return result
                if event.get("usage"):
                    result.prompt_tokens = event["usage"].get("prompt_tokens")
                    result.output_tokens = event["usage"].get("completion_tokens", 0)
                for choice in event.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if delta.get("content") or delta.get("reasoning_content"):
                        now = time.perf_counter()
                        if last is None:
                            result.ttft = now - start
                        else:
                            result.gaps.append(now - last)
                        last = now
                        chunks += 1
                    finished = finished or choice.get("finish_reason") is not None
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return result
    except json.JSONDecodeError as e:
        result.error = f"a stream event is not JSON ({e})"
        return result
    finally:
        result.end = time.perf_counter()
    if not (done and finished):
        result.error = "the stream ended before its finish_reason and [DONE]"
    elif result.ttft is None:
        result.error = "the answer had no text"
    else:
        result.ok = True
        result.output_tokens = result.output_tokens or chunks  # without usage: one token per chunk
    return result


def _error_message(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    try:
        error = json.loads(text).get("error")
        text = error.get("message", text) if isinstance(error, dict) else str(error or text)
    except (json.JSONDecodeError, AttributeError):
        pass
    return " ".join(text.split())[:300]


# --- prompts ------------------------------------------------------------------------------------


def prompt_text(rng: random.Random, tag: str, words: int) -> str:
    """Distinct from the first token on (a server's prefix cache cannot share them)."""
    return f"Request {tag}: " + " ".join(rng.choice(WORDS) for _ in range(words))


def request_body(cfg: LoadConfig, model: str, text: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if cfg.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension, also read by tandem and llama.cpp
    return body


async def calibrate(client: httpx.AsyncClient, cfg: LoadConfig, model: str) -> tuple[int, int | None]:
    """Words per prompt for about --prompt-tokens tokens (chat template included), from two requests
    of different lengths; they also warm the server up. Returns (words, measured tokens or None)."""
    rng = random.Random(cfg.seed - 1)
    sizes = (CALIBRATION_WORDS, CALIBRATION_WORDS + max(8, cfg.prompt_tokens))
    counts = []
    for i, words in enumerate(sizes):  # tags shaped like the levels' ("C.I"), so they cost as many tokens
        r = await one_request(client, request_body(cfg, model, prompt_text(rng, f"0.{i}", words),
                                                   min(cfg.max_tokens, 8)))
        if not r.ok:
            raise LoadError(f"the warm-up request failed: {r.error}")
        counts.append(r.prompt_tokens)
    if None in counts or counts[1] <= counts[0]:
        return cfg.prompt_tokens, None  # no usage from this server: assume a token per word
    per_word = (counts[1] - counts[0]) / (sizes[1] - sizes[0])
    fixed = counts[0] - per_word * sizes[0]  # the chat template and the "Request N:" tag
    return max(1, round((cfg.prompt_tokens - fixed) / per_word)), counts[1]


# --- one level ----------------------------------------------------------------------------------


def percentiles(values: list[float], scale: float = 1e3) -> dict[str, float | None]:
    """p50 / p90 / p99 by linear interpolation between order statistics (numpy's default)."""
    out: dict[str, float | None] = {}
    ordered = sorted(values)
    for p in (50, 90, 99):
        if not ordered:
            out[f"p{p}"] = None
            continue
        pos = (len(ordered) - 1) * p / 100
        lo, hi = math.floor(pos), math.ceil(pos)
        value = ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
        out[f"p{p}"] = round(value * scale, 3)
    return out


async def run_level(client: httpx.AsyncClient, cfg: LoadConfig, model: str, concurrency: int, words: int) -> dict:
    total = cfg.level_requests(concurrency)
    rng = random.Random(cfg.seed * 1_000_003 + concurrency)
    bodies = [request_body(cfg, model, prompt_text(rng, f"{concurrency}.{i}", words), cfg.max_tokens)
              for i in range(total)]
    results: list[Result] = []
    next_index = iter(range(total))
    start = time.perf_counter()
    deadline = start + cfg.time_limit
    cut = False

    async def stream_worker() -> None:
        nonlocal cut
        for i in next_index:  # shared: each request is sent once, by whichever stream is free
            if time.perf_counter() >= deadline:
                cut = True
                return
            results.append(await one_request(client, bodies[i]))

    await asyncio.gather(*(stream_worker() for _ in range(concurrency)))
    wall = (max(r.end for r in results) if results else time.perf_counter()) - start
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    output_tokens = sum(r.output_tokens for r in ok)
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors,
        "stopped_by_time_limit": cut,
        "wall_s": round(wall, 3),
        "output_tokens": output_tokens,
        "prompt_tokens_mean": round(sum(prompts) / len(prompts), 1) if prompts else None,
        "output_tok_s": round(output_tokens / wall, 3) if wall > 0 else 0.0,
        "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else 0.0,
        "ttft_ms": percentiles([r.ttft for r in ok]),
        "itl_ms": percentiles([g for r in ok for g in r.gaps]),
        "vs_concurrency_1": None,
    }


def served_model(url: str, api_key: str | None) -> str:
    """The model id the server answers to; a clear LoadError when nothing usable answers at `url`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=10, trust_env=not _loopback(url))
    except httpx.HTTPError as e:
        raise LoadError(f"cannot reach {url} ({type(e).__name__}: {e}): is `tandem serve` running there? "
                        "Leave out --url to let this script start a server") from None
    if r.status_code != 200:
        hint = "; pass --api-key" if r.status_code == 401 else ""
        raise LoadError(f"GET {url}/v1/models answered {r.status_code}: {_error_message(r.content)}{hint}")
    try:
        return r.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise LoadError(f"GET {url}/v1/models did not list a model: is this an OpenAI-compatible server?") from None


def _loopback(url: str) -> bool:
    return (urlsplit(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


def _flag_value(args: tuple[str, ...], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


# --- the run ------------------------------------------------------------------------------------


async def measure(cfg: LoadConfig, url: str, model: str, server: Server | None) -> tuple[list[dict], dict]:
    api_key = cfg.api_key or _flag_value(cfg.server_args, "--api-key")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    streams = max(cfg.concurrency)
    limits = httpx.Limits(max_connections=streams + 2, max_keepalive_connections=streams + 2)
    timeout = httpx.Timeout(cfg.request_timeout, connect=10)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout,
                                 trust_env=not _loopback(url)) as client:
        words, measured = await calibrate(client, cfg, model)
        prompt = {"words": words, "calibration_tokens": measured}
        levels = []
        for c in cfg.concurrency:
            print(f"concurrency {c}: {cfg.level_requests(c)} requests at most, {cfg.time_limit:g} s at most",
                  file=sys.stderr, flush=True)
            levels.append(await run_level(client, cfg, model, c, words))
            if server is not None:
                server.check_alive()
    base = next((lv["output_tok_s"] for lv in levels if lv["concurrency"] == 1), None)
    for lv in levels:
        lv["vs_concurrency_1"] = round(lv["output_tok_s"] / base, 3) if base else None
    return levels, prompt


def format_table(levels: list[dict], title: str) -> str:
    def trio(d: dict) -> str:
        return "/".join("-" if d[k] is None else f"{d[k]:.1f}" for k in ("p50", "p90", "p99"))

    head = ("conc", "reqs", "ok", "fail", "prompt tok", "out tok/s", "x c=1", "TTFT p50/p90/p99 ms",
            "ITL p50/p90/p99 ms")
    rows = [head]
    for lv in levels:
        ratio = "-" if lv["vs_concurrency_1"] is None else f"{lv['vs_concurrency_1']:.2f}"
        prompt = "-" if lv["prompt_tokens_mean"] is None else f"{lv['prompt_tokens_mean']:.0f}"
        sent = f"{lv['requests']}{'*' if lv['stopped_by_time_limit'] else ''}"
        rows.append((str(lv["concurrency"]), sent, str(lv["ok"]), str(lv["failed"]), prompt,
                     f"{lv['output_tok_s']:.1f}", ratio, trio(lv["ttft_ms"]), trio(lv["itl_ms"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [title] + ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    if any(lv["stopped_by_time_limit"] for lv in levels):
        lines.append("  * --time-limit stopped the level before it sent --requests")
    for lv in levels:
        for message, n in lv["errors"].items():
            lines.append(f"  concurrency {lv['concurrency']}: {n} x {message}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> LoadConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="measure the server running here (default: start `tandem serve` on a free port)")
    p.add_argument("--server-args", default="",
                   help="arguments for the `tandem serve` this script starts, e.g. \"MODEL --device cuda "
                        "--cpu-threads 14\" (default: the built-in demo model; --max-batch defaults to the "
                        "largest --concurrency)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated levels of concurrent streams")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level (default: 4 x the level's concurrency, at least 8)")
    p.add_argument("--time-limit", type=float, default=25.0,
                   help="seconds per level after which no new request starts (default: 25)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default: 64)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length, about (default: 128)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate --max-tokens whatever the model says (default: on)")
    p.add_argument("--api-key", help="the server's API key (default: --api-key in --server-args, if any)")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for the server to load")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds one response may stay silent before it counts as failed")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts' words")
    p.add_argument("--json", dest="json_path", help="write the results here")
    args = p.parse_args(argv)
    try:
        levels = tuple(int(c) for c in args.concurrency.split(",") if c.strip())
    except ValueError:
        raise LoadError(f"--concurrency {args.concurrency!r} must be comma-separated integers, e.g. 1,4,16") from None
    values = {k: v for k, v in vars(args).items() if k not in ("concurrency", "server_args")}
    return LoadConfig(concurrency=levels, server_args=tuple(shlex.split(args.server_args)), **values)


def main(argv: list[str] | None = None) -> int:
    server: Server | None = None
    failed = True
    try:
        cfg = parse_args(argv)
        if cfg.url is None:
            server = Server(cfg.server_args, max(cfg.concurrency), cfg.startup_timeout)
            server.start()
        url = cfg.url.rstrip("/") if cfg.url else server.url
        model = served_model(url, cfg.api_key or _flag_value(cfg.server_args, "--api-key"))
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        levels, prompt = asyncio.run(measure(cfg, url, model, server))
        failed = any(lv["ok"] == 0 for lv in levels)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        if server is not None:
            server.stop(failed)
    title = (f"serve load: {model} at {url}, prompts ~{cfg.prompt_tokens} tok, {cfg.max_tokens} tok per answer, "
             f"greedy{', ignore_eos' if cfg.ignore_eos else ''}")
    config = {**asdict(cfg), "api_key": cfg.api_key and "***", "server_args": redacted(cfg.server_args)}
    command = ["python", os.path.relpath(__file__), *redacted(argv if argv is not None else sys.argv[1:])]
    report = {"model": model, "url": url, "started": started, "config": config,
              "server_command": redacted(server.command) if server else None, "prompt": prompt, "levels": levels,
              "reproduce": shlex.join(command)}
    if cfg.json_path:
        with open(cfg.json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    print(format_table(levels, title))
    if failed:
        print("error: a level had no successful request (see the errors above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
