"""Ordered placement rules: (regex over a tandem parameter name -> target), first match wins.

Names are tandem's parameter names, the same for every architecture: `embed.weight`,
`layers.N.attn.*`, `layers.N.attn_norm.weight`, `layers.N.ffn.router.*`,
`layers.N.ffn.experts.w_{gate,up,down}` (routed experts), `layers.N.ffn.shared.*`,
`layers.N.ffn.{gate,up,down}_proj.weight` (dense layers), `norm.weight`, `lm_head.weight`.
A pattern matches anywhere in the name (re.search, as llama.cpp's --override-tensor does).

Targets:
  cpu-engine  routed experts in the C++ CPU engine (tandem._C), x copied to the CPU and back
  gpu         plain torch on the --device GPU (routed experts there use the torch experts backend)
  cpu         plain torch on the CPU (with --device cpu)

Today every non-expert weight runs on the --device; only routed experts may go elsewhere. The
rules of a --placement file come first, then the preset's (--cpu-moe, --n-cpu-moe-layers N,
--experts torch), then a catch-all for the --device, so every name resolves.

Rules file: JSON (a list of {"match": REGEX, "target": TARGET} or [REGEX, TARGET]) or text with one
`REGEX = TARGET` per line ('#' starts a comment line). Errors name the file and line (or rule). A
rule that matches none of the model's routed experts changes nothing: a warning names it.
"""

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tandem.errors import TandemError

log = logging.getLogger(__name__)

TARGETS = ("cpu-engine", "gpu", "cpu")
EXPERTS = r"(^|\.)experts\."  # routed experts' parameters (MoE.experts); shared experts are `shared`
# The names the rules see of a routed-experts module's weights (runtime.plan resolves these).
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


@dataclass(frozen=True)
class Target:
    """Where one parameter lives and what computes with it."""

    device: str  # torch device: "cpu", "cuda", "cuda:1"
    backend: str  # "torch" or "engine" (the C++ CPU engine)

    def __post_init__(self):
        if self.backend not in ("torch", "engine"):
            raise TandemError(f"unknown backend {self.backend!r}; choose torch or engine")
        if self.backend == "engine" and self.device != "cpu":
            raise TandemError(f"the CPU engine runs on the CPU, not {self.device}")

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def label(self) -> str:
        return "cpu-engine" if self.backend == "engine" else self.device


@dataclass(frozen=True)
class Rule:
    pattern: str  # regex searched in the parameter name
    target: str  # one of TARGETS
    origin: str = ""  # where the rule came from, for error messages: "--cpu-moe", "rules.txt:3"

    def __post_init__(self):
        where = f"{self.origin}: " if self.origin else ""
        if self.target not in TARGETS:
            raise TandemError(f"{where}unknown placement target {self.target!r}; choose one of {', '.join(TARGETS)}")
        try:
            re.compile(self.pattern)
        except (re.error, OverflowError, RecursionError) as e:  # a{99999999999}; thousands of nested groups
            raise TandemError(f"{where}bad regex {_short(self.pattern)} ({e})") from None

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


def _short(pattern: str, limit: int = 80) -> str:
    return repr(pattern) if len(pattern) <= limit else repr(pattern[:limit]) + f"... ({len(pattern)} characters)"


def check_device(device: str) -> str:
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise TandemError(f"--device {device!r} is not supported; choose cpu, cuda or cuda:N")
    return device


@dataclass(frozen=True)
class Placement:
    """Resolved rules for one model: every name gets the first matching rule's target."""

    rules: tuple[Rule, ...]
    device: str  # the --device: where every non-expert weight, the KV cache and activations live

    def __post_init__(self):
        check_device(self.device)
        if not self.rules:
            raise TandemError("a placement needs at least one rule")

    def rule_for(self, name: str) -> Rule:
        for rule in self.rules:
            if rule.matches(name):
                return rule
        raise TandemError(f"no placement rule matches {name!r}; add a catch-all rule ('.* = gpu')")

    def resolve(self, name: str, routed_experts: bool) -> Target:
        """The target of parameter `name`; routed_experts: it belongs to a MoE layer's routed experts."""
        rule = self.rule_for(name)
        where = f"{rule.origin}: " if rule.origin else ""
        said = f"{where}'{rule.pattern} = {rule.target}' matches {name}"
        if rule.target == "cpu-engine":
            if not routed_experts:
                raise TandemError(f"{said}, but the CPU engine only runs routed experts")
            return Target("cpu", "engine")
        if rule.target != ("cpu" if self.device == "cpu" else "gpu"):
            if rule.target == "gpu":
                raise TandemError(f"{said}, but --device is cpu; pass --device cuda")
            if routed_experts:
                # Torch experts on the CPU beside a GPU model would need activations moved, which
                # only the engine backend does today.
                raise TandemError(f"{said}; with --device {self.device} routed experts go to cpu-engine or gpu")
            raise TandemError(
                f"{said}, but non-expert weights run on the --device ({self.device}) for now; "
                "only routed experts can be placed elsewhere"
            )
        return Target(self.device, "torch")


@dataclass(frozen=True)
class PlacementOptions:
    """The placement flags, one field each (see tandem.cli.main.add_model_options)."""

    device: str = "cpu"  # --device
    experts: str = "cpu"  # --experts: cpu (the C++ engine) | torch (plain torch on the --device)
    cpu_moe: bool = False  # --cpu-moe: routed experts in the CPU engine (the default, said explicitly)
    n_cpu_moe_layers: int | None = None  # --n-cpu-moe-layers: experts of the first N MoE layers in the engine
    rules_file: str | None = None  # --placement FILE: rules tried before the preset's

    def __post_init__(self):
        check_device(self.device)
        if self.experts not in ("cpu", "torch"):
            raise TandemError(f"unknown experts backend {self.experts!r}; choose cpu or torch")
        if self.n_cpu_moe_layers is not None:
            if self.n_cpu_moe_layers < 0:
                raise TandemError(f"--n-cpu-moe-layers must be >= 0, got {self.n_cpu_moe_layers}")
            if self.cpu_moe or self.experts == "torch":
                flag = "--cpu-moe" if self.cpu_moe else "--experts torch"
                raise TandemError(f"--n-cpu-moe-layers and {flag} both place the routed experts; give one of them")
        if self.cpu_moe and self.experts == "torch":
            raise TandemError("--cpu-moe puts routed experts in the CPU engine, --experts torch does not; give one of them")


def preset_rules(opts: PlacementOptions, experts_modules: Sequence[str]) -> tuple[Rule, ...]:
    """The preset's rules; experts_modules: the routed-experts modules' names in layer order."""
    main = "cpu" if opts.device == "cpu" else "gpu"
    if opts.experts == "torch":
        rules = [Rule(EXPERTS, main, "--experts torch")]
    elif opts.n_cpu_moe_layers is not None:
        n = opts.n_cpu_moe_layers
        first = experts_modules[:n]
        rules = [Rule(r"^(" + "|".join(re.escape(m) for m in first) + r")\.", "cpu-engine", f"--n-cpu-moe-layers {n}")] if first else []
        rules.append(Rule(EXPERTS, main, f"--n-cpu-moe-layers {n}"))
    else:
        rules = [Rule(EXPERTS, "cpu-engine", "--cpu-moe")]
    return tuple(rules) + (Rule(".*", main, f"--device {opts.device}"),)


def build_placement(opts: PlacementOptions, experts_modules: Sequence[str]) -> Placement:
    """The rules file's rules (if any), then the preset's."""
    custom = read_rules_file(opts.rules_file) if opts.rules_file else ()
    names = [f"{m}.{w}" for m in experts_modules for w in EXPERT_WEIGHTS]
    for rule in custom:
        # Only routed experts can be placed (every other weight runs on the --device), so a rule
        # that matches none of them does nothing: most likely a typo or another program's names.
        if names and not any(rule.matches(n) for n in names):
            # A warning, not an error: one rules file may serve models of other depths.
            log.warning("%s: '%s = %s' matches none of this model's routed experts (names like %s); only "
                        "routed experts can be placed, other weights run on the --device",
                        rule.origin, rule.pattern, rule.target, names[0])
    return Placement(custom + preset_rules(opts, experts_modules), opts.device)


def read_rules_file(path: str | Path) -> tuple[Rule, ...]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # an editor's byte-order mark would join the first regex
    except OSError as e:
        raise TandemError(f"cannot read placement file {str(path)!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise TandemError(f"placement file {str(path)!r} is not UTF-8 text") from None
    if path.suffix == ".json" or text.lstrip()[:1] in ("[", "{"):
        return parse_json_rules(text, path.name)
    return parse_text_rules(text, path.name)


def parse_text_rules(text: str, source: str = "rules") -> tuple[Rule, ...]:
    """`REGEX = TARGET` per line; blank lines and lines starting with '#' are skipped."""
    rules = []
    for no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        origin = f"{source}:{no}"
        # The target is the last '=' field: a regex may contain '=' itself.
        pattern, sep, target = line.rpartition("=")
        if not sep or not pattern.strip():
            raise TandemError(f"{origin}: expected 'REGEX = TARGET', got {line!r}")
        rules.append(Rule(pattern.strip(), target.strip(), origin))
    if not rules:
        raise TandemError(f"{source}: no placement rules in the file")
    return tuple(rules)


def parse_json_rules(text: str, source: str = "rules.json") -> tuple[Rule, ...]:
    """A JSON list of {"match": REGEX, "target": TARGET} objects or [REGEX, TARGET] pairs."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise TandemError(f"{source}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # a number of 5000 digits; nesting too deep to parse
        raise TandemError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(items, list) or not items:
        raise TandemError(f"{source}: expected a non-empty JSON list of rules")
    rules = []
    for i, item in enumerate(items, 1):
        origin = f"{source}: rule {i}"
        if isinstance(item, dict) and set(item) == {"match", "target"}:
            pattern, target = item["match"], item["target"]
        elif isinstance(item, list) and len(item) == 2:
            pattern, target = item
        else:
            raise TandemError(f'{origin}: expected {{"match": REGEX, "target": TARGET}} or [REGEX, TARGET], got {item!r}')
        if not isinstance(pattern, str) or not isinstance(target, str):
            raise TandemError(f"{origin}: match and target must be strings")
        rules.append(Rule(pattern, target, origin))
    return tuple(rules)
