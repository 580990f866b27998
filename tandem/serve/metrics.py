"""Server counters and their Prometheus text exposition (format 0.0.4), without a client library.

One `Metrics` object per app, touched only from the event loop thread; queue depth and running
requests are read from the AsyncEngine when scraped.
"""

from __future__ import annotations

from collections import Counter


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, int]] = Counter()  # (method, route, status) -> count
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.finished = Counter()  # finish reason -> requests
        self.decode_tok_s = 0.0  # decode speed of the last finished request

    def count_request(self, method: str, route: str, status: int) -> None:
        self.requests[(method, route, status)] += 1

    def count_generation(self, prompt_tokens: int, generated: int, reason: str | None, decode_tok_s: float) -> None:
        self.prompt_tokens += prompt_tokens
        self.generated_tokens += generated
        self.finished[reason or "abort"] += 1
        if decode_tok_s > 0:
            self.decode_tok_s = decode_tok_s

    def render(self, queue_depth: int, running: int) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

        metric("tandem_http_requests_total", "counter", "HTTP requests by method, route and status.",
               [(_labels(method=m, route=r, status=str(s)), n) for (m, r, s), n in sorted(self.requests.items())])
        metric("tandem_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
               [("", self.prompt_tokens)])
        metric("tandem_generated_tokens_total", "counter", "Tokens generated.", [("", self.generated_tokens)])
        metric("tandem_requests_finished_total", "counter", "Generations by finish reason (stop, length, abort).",
               [(_labels(reason=r), n) for r, n in sorted(self.finished.items())])
        metric("tandem_decode_tokens_per_second", "gauge", "Decode speed of the last finished request.",
               [("", self.decode_tok_s)])
        metric("tandem_queue_depth", "gauge", "Requests waiting for their first token.", [("", queue_depth)])
        metric("tandem_requests_running", "gauge", "Requests generating tokens.", [("", running)])
        return "\n".join(out) + "\n"


def _labels(**labels: str) -> str:
    # Label values escape backslash, double quote and newline, per the exposition format.
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"
