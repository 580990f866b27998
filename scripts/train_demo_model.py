"""Train tandem's demo model: a small DeepSeek-V3-architecture MoE on Python's standard library.

Run on a GPU machine (minutes):  python scripts/train_demo_model.py --out DIR [--minutes 5]

The architecture is DeepSeek-V3's (MLA, sigmoid routing with an aux-loss-free correction bias
updated from expert loads, grouped top-k, 16 routed experts top-4, one shared expert, first layer
dense). The corpus is what every Python install has: the standard library's sources, plus chat
turns built from its docstrings ("What does json.dumps do?" -> the docstring), so that
`tandem chat` answers in the template's format. Training uses HF transformers' DeepSeek-V3 (a
dev/test dependency); the result is written in the hub's checkpoint layout (one tensor per
expert), bf16, with tokenizer, chat template and the held-out text (<= 1 MB) for `tandem eval`.
Deterministic data and init for a given --seed (GPU kernels may still differ in the last bits).
"""

import argparse
import ast
import hashlib
import inspect
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script run from a checkout
from tandem.testing.tiny import write_safetensors  # noqa: E402
from tandem.testing.tiny_tokenizer import ASSISTANT, BOS, EOS, USER, write_tokenizer  # noqa: E402

VOCAB = 4096
SEQ = 512
HELDOUT_BYTES = 1_000_000
CONFIG = dict(
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=VOCAB,
    hidden_size=256, intermediate_size=768, moe_intermediate_size=192, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
    num_experts_per_tok=4, n_shared_experts=1, routed_scaling_factor=2.5, scoring_func="sigmoid",
    topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True, first_k_dense_replace=1,
    moe_layer_freq=1, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6,
    hidden_act="silu", tie_word_embeddings=False, attention_bias=False, bos_token_id=0,
    eos_token_id=1, num_nextn_predict_layers=0, torch_dtype="bfloat16",
)


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "__pycache__")
    return sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))


def split_of(path: Path) -> str:
    """Files go to train, validation (picks the checkpoint) or held-out (shipped, for eval)."""
    h = int(hashlib.sha256(str(path.name).encode()).hexdigest(), 16) % 25
    return {0: "heldout", 1: "validation"}.get(h, "train")


def docstring_chats(source: str, module: str) -> list[tuple[str, str]]:
    """(question, answer) pairs from a module's documented functions and classes."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    pairs = []
    doc = ast.get_docstring(tree)
    if doc:
        pairs.append((f"What is the {module} module for?", inspect.cleandoc(doc).split("\n\n")[0]))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                answer = inspect.cleandoc(doc).split("\n\n")[0][:600]
                pairs.append((f"What does the {kind} {module}.{node.name} do?", answer))
    return pairs


def build_corpus(seed: int) -> tuple[list[str], str, str]:
    """Training documents (source files and chat turns, shuffled), validation and held-out text."""
    docs, heldout, validation = [], [], []
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        split = split_of(path)
        if split != "train":
            (heldout if split == "heldout" else validation).append(text)
            continue
        docs.append(BOS + text + EOS)
        if "test" not in module:  # test docstrings make poor answers
            docs += [f"{BOS}{USER}{q}{ASSISTANT}{a}{EOS}" for q, a in docstring_chats(text, module)]
    random.Random(seed).shuffle(docs)
    return docs, "\n".join(validation)[:HELDOUT_BYTES], "\n".join(heldout)[:HELDOUT_BYTES]


def pack(tokenizer, docs: list[str]) -> torch.Tensor:
    ids = []
    for enc in tokenizer.encode_batch(docs, add_special_tokens=False):
        ids += enc.ids
    n = len(ids) // (SEQ + 1)
    return torch.tensor(ids[: n * (SEQ + 1)]).view(n, SEQ + 1)


def hub_state_dict(model) -> dict[str, torch.Tensor]:
    """transformers 5 fuses experts ([E, 2I, H] gate_up, [E, H, I] down); the hub layout has one
    tensor per expert, which is what real DeepSeek checkpoints (and tandem's loader) use."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().to(torch.bfloat16).cpu().contiguous()
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix, inter = name.removesuffix("gate_up_proj"), t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:].clone()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].clone()
        elif name.endswith("e_score_correction_bias"):
            out[name] = t.float()  # the bias only ranks experts; keep it exact
        else:
            out[name] = t
    return out


@torch.no_grad()
def heldout_ppl(model, data: torch.Tensor, batch: int, dev: str) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch):
        x = data[i : i + batch].to(dev)
        with torch.autocast(dev, dtype=torch.bfloat16):
            logits = model(x[:, :-1]).logits.float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
    model.train()
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=5.0, help="training time budget")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-docs", type=int, default=0, help="use only this many documents (smoke tests)")
    ap.add_argument("--bias-rate", type=float, default=1e-3, help="correction-bias update per step")
    args = ap.parse_args()
    from tokenizers import Tokenizer
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    docs, validation, heldout = build_corpus(args.seed)
    if args.max_docs:
        docs = docs[: args.max_docs]
    write_tokenizer(out, VOCAB, corpus=(line for d in docs for line in d.splitlines()))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    data = pack(tok, docs)
    held = pack(tok, [heldout])
    val = pack(tok, [validation])[:128]
    (out / "heldout.txt").write_text(heldout, encoding="utf-8")
    print(f"corpus: {len(docs)} docs, {data.numel() / 1e6:.1f}M train tokens, {held.numel()} held-out tokens "
          f"({time.time() - t0:.0f}s)", flush=True)

    cfg = DeepseekV3Config(**{k: v for k, v in CONFIG.items() if k not in ("architectures", "model_type", "torch_dtype")})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = DeepseekV3ForCausalLM(cfg).to(dev).train()
    loads = {}

    def count(module, _inp, out):  # expert loads feed the aux-loss-free bias update
        loads[module] = loads.get(module, 0) + torch.bincount(out[2].flatten(), minlength=CONFIG["n_routed_experts"])

    routers = [m for m in model.modules() if type(m).__name__.endswith("TopkRouter")]
    for r in routers:
        r.register_forward_hook(count)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    budget, step, start = args.minutes * 60, 0, time.time()
    est_steps = None
    best = (float("inf"), 0, None)
    while time.time() - start < budget:
        idx = torch.randint(0, len(data), (args.batch,), generator=gen)
        x = data[idx].to(dev, non_blocking=True)
        frac = (time.time() - start) / budget
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(dev, dtype=torch.bfloat16):
            logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for r in routers:
                load = loads.pop(r).float()
                r.e_score_correction_bias += args.bias_rate * torch.sign(load.mean() - load)
        step += 1
        if step % 500 == 0:  # keep the weights that generalize best, not the last (it overfits)
            val_ppl = heldout_ppl(model, val, args.batch, dev)
            if val_ppl < best[0]:
                best = (val_ppl, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
            print(f"step {step}: validation perplexity {val_ppl:.2f} (best {best[0]:.2f} at {best[1]})", flush=True)
        if step % 200 == 0:
            elapsed = time.time() - start
            est_steps = int(step * budget / elapsed)
            tok_s = step * args.batch * SEQ / elapsed
            print(f"step {step}/{est_steps} loss {loss.item():.3f} lr {lr:.2e} {tok_s / 1e3:.0f}k tok/s ({elapsed:.0f}s)", flush=True)
    if best[2] is not None and heldout_ppl(model, val, args.batch, dev) > best[0]:
        model.load_state_dict(best[2])
    ppl = heldout_ppl(model, held, args.batch, dev)
    print(f"trained {step} steps in {time.time() - start:.0f}s; kept step {best[1] or step}; "
          f"held-out perplexity {ppl:.2f}", flush=True)

    # Two shards keep each file under 16 MiB (handy for transfers); the loader reads the index.
    write_safetensors(out, hub_state_dict(model), shards=2)
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    gen_cfg.update(temperature=0.3, top_p=0.9, do_sample=True)
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps({
        "seed": args.seed, "steps": step, "batch": args.batch, "seq": SEQ, "lr": args.lr,
        "minutes": args.minutes, "kept_step": best[1] or step, "heldout_ppl": ppl, "train_tokens": data.numel(),
        "python": sys.version.split()[0], "torch": torch.__version__,
    }, indent=2) + "\n")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
