"""What holds the draft head's MT-Bench acceptance near 0.4: head designs and prompt sources, one corpus.

The target (q4, as chat runs it) answers --prompts training prompts greedily (cached in --work),
keeping beside each reply token its last hidden state and the output of its 4th layer; it
answers MT-Bench's first turns the same way (evaluation only, never trained on). Every variant
learns one thing, the first draft token: at reply token r_j, predict r_{j+1} (the recipe's loss:
half cross-entropy to the target's token, half KL to its distribution, plus the distance to its
next hidden state; depth 1, so each trains in minutes). Reported: first-token greedy acceptance
on MT-Bench, and on the first 80 training replies (how far it overfits).
  mlp        the shipped head's block on (H_j, embed(r_j)): the target's state that chose r_j
  early      the same block on (the target's 4th-layer output at r_j, H_j): the target's first
             four layers run on the new token, with attention over the whole conversation
             (Kangaroo's idea; a draft step would then cost four of the target's 30 layers)
  init       mlp with its MLP copied from the target's last layer and its fused input starting
             as H_j (knowledge the head need not learn from a small corpus)
  attention  one decoder layer with causal attention over the reply's fused states (EAGLE's
             head), copied from the target's last layer; 6 epochs of 2 replies a step
--source target: the training prompts are written by the target itself (sampled, temperature
0.9, from its chat template's user prefix alone: Magpie's idea) instead of the templates.
Usage: python bench/head_ceiling.py [--prompts 500] [--source templates|target] [--variants mlp,early,...]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from specmemo.memory.kvstore import KVShape, KVStore  # noqa: E402
from specmemo.memory.malloc import tame_glibc_malloc  # noqa: E402
from specmemo.models.draft_head import DraftHead, TargetParts, unit_rms  # noqa: E402
from specmemo.budget.devices import load_device  # noqa: E402
from specmemo.models.load import load_model  # noqa: E402
from specmemo.models.resolve import resolve  # noqa: E402
from specmemo.models.text import encode_prompt, stop_ids  # noqa: E402
from specmemo.host import cpu_name  # noqa: E402
from specmemo.profiling.prompts import load_prompts  # noqa: E402
from specmemo.training.draft_head import cached_corpus, head_vocab, step_loss, write_corpus  # noqa: E402
from specmemo.training.prompts import training_prompts  # noqa: E402

MT_BENCH = ROOT.parent / "shared" / "data" / "mt_bench_questions.jsonl"
EARLY = 3                      # the 4th layer's output (index 3): what `early` reads at the new token
VARIANTS = ("mlp", "early", "init", "attention")


@torch.inference_mode()
def target_written_prompts(model, tok, count: int, seed: int, batch: int = 16, longest: int = 96) -> list[str]:
    """`count` user turns the target writes itself: from its chat template up to the user's text,
    sampled at temperature 0.9 until it ends the turn; turns under three words or past `longest`
    tokens are dropped."""
    text = tok.decode(encode_prompt(tok, "\x00", chat=True))
    prefix = tok(text[: text.index("\x00")], add_special_tokens=False)["input_ids"]
    stop, cfg = stop_ids(tok, model), model.cfg
    store = KVStore(KVShape(cfg.num_layers, batch, cfg.num_kv_heads, cfg.head_dim, len(prefix) + longest),
                    model.dtype, model.device)
    rows = [store.row(b) for b in range(batch)]
    gen = torch.Generator().manual_seed(seed)
    out, slots = [], [None] * batch
    while len(out) < count:
        for b, slot in enumerate(slots):
            if slot is None:
                rows[b].reset()
                slots[b] = {"feed": list(prefix), "tokens": []}
        logits = torch.cat(model.forward_rows(rows, [s["feed"] for s in slots], [1] * batch))     # [batch, V]
        chosen = torch.multinomial(torch.softmax(logits.float() / 0.9, -1), 1, generator=gen)[:, 0].tolist()
        for b, slot in enumerate(slots):
            slot["tokens"].append(chosen[b])
            slot["feed"] = [chosen[b]]
            if chosen[b] in stop or len(slot["tokens"]) == longest:
                turn = tok.decode(slot["tokens"][:-1]).strip()
                if chosen[b] in stop and len(turn.split()) >= 3:
                    out.append(turn)
                slots[b] = None
    return out[:count]


def corpus_for(model, tok, prompts: list[str], max_new: int, batch: int, path: Path) -> list[dict]:
    key = {"prompts": prompts, "max_new": max_new, "layers": [EARLY]}
    corpus, seconds, reused = cached_corpus(path, key, lambda: write_corpus(
        model, [encode_prompt(tok, p, chat=True) for p in prompts], stop_ids(tok, model), max_new, batch))
    if not reused:
        print(f"{path.name}: {sum(len(c['reply']) for c in corpus)} reply tokens in {seconds:.0f} s", flush=True)
    return corpus


def examples(reply: dict) -> dict:
    """One reply's first-draft examples, j = 0..m-2: the state that chose r_j, the 4th-layer output
    at r_j, r_j itself, and what the target did next (its state at r_j and its token r_{j+1})."""
    j = torch.arange(len(reply["reply"]) - 1)
    return {"h": reply["hidden"][j].float(), "early": reply["layers"][j + 1, 0].float(), "x": reply["reply"][j],
            "next_h": reply["hidden"][j + 1].float(), "next": reply["reply"][j + 1]}


class Attention(nn.Module):
    """EAGLE's head: the fused (h, embed(x)) of every reply position through one decoder layer
    (causal attention, then SwiGLU), its weights copied from a target layer."""

    def __init__(self, model, layer):
        super().__init__()
        E, self.model = model.cfg.hidden_size, model
        self.norm_h, self.norm_x = nn.Parameter(torch.ones(E)), nn.Parameter(torch.ones(E))
        self.fuse = nn.Linear(2 * E, E, bias=False)
        with torch.no_grad():   # the fused state starts as h (unit RMS times 3), x's part small
            self.fuse.weight[:, :E].copy_(torch.eye(E) * 3.0)
            self.fuse.weight[:, E:].mul_(0.1)
        names = ("attn_norm", "w_qkv", "w_o", "mlp_norm", "w_gate_up", "w_down")
        self.w = nn.ParameterDict({n: nn.Parameter(getattr(layer, n).float().clone()) for n in names})

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """h, e [B, n, E] -> the predicted next states [B, n, E]."""
        cfg, w = self.model.cfg, self.w
        B, n, _ = h.shape
        H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        z = self.fuse(torch.cat([unit_rms(h) * self.norm_h, unit_rms(e) * self.norm_x], -1))
        qkv = ((unit_rms(z) * w["attn_norm"]) @ w["w_qkv"]).view(B, n, H + 2 * Hkv, D)
        cos, sin = (t.float() for t in self.model.rope(torch.arange(n)))
        qk = qkv[:, :, : H + Hkv]
        qk = qk * cos + qk[..., self.model.swap_halves] * sin
        q, k, v = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), qkv[:, :, H + Hkv :].transpose(1, 2)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, n, H * D)
        z = z + out @ w["w_o"]
        gate, up = ((unit_rms(z) * w["mlp_norm"]) @ w["w_gate_up"]).chunk(2, -1)
        return z + (F.silu(gate) * up) @ w["w_down"]


def pad(replies: list[dict]) -> dict:
    """Replies' examples stacked to the longest, `next` −1 where padded."""
    n = max(len(r["x"]) for r in replies)
    out = {}
    for key in replies[0]:
        fill = -1 if key == "next" else 0
        out[key] = torch.stack([F.pad(r[key], (0, 0, 0, n - len(r[key])) if r[key].dim() == 2
                                      else (0, n - len(r[key])), value=fill) for r in replies])
    return out


def train(name: str, model, dense, parts: TargetParts, index: torch.Tensor, train_set: list[dict], seed: int):
    """The variant's module and predict(examples) -> states, trained on train_set. dense: the
    target in fp32 (where its last layer's weights are read)."""
    torch.manual_seed(seed)
    E = model.cfg.hidden_size
    if name == "attention":
        module = Attention(dense, dense.layers[-1])
        predict = lambda ex: module(ex["h"], parts.embed(ex["x"]))                    # noqa: E731
        epochs, lr, per_step = 6, 1e-3, 2
        count = len(train_set)
        batch_of = lambda idx: pad([train_set[i] for i in idx])                         # noqa: E731
    else:
        module = DraftHead(E, model.cfg.intermediate_size, (index >= 0).nonzero()[:, 0])
        if name == "early":
            predict = lambda ex: module.block(ex["early"], ex["h"])                   # noqa: E731
        else:
            predict = lambda ex: module.block(ex["h"], parts.embed(ex["x"]))          # noqa: E731
        flat = {k: torch.cat([r[k] for r in train_set]) for k in train_set[0]}
        if name == "init":
            last = dense.layers[-1]
            with torch.no_grad():
                module.gate_up.weight.copy_(last.w_gate_up.float().t())
                module.down.weight.copy_(last.w_down.float().t())
                module.norm_m.copy_(last.mlp_norm.float())
                module.fuse.weight[:, :E].copy_(torch.eye(E) * float(flat["h"].pow(2).mean().sqrt()))
                module.fuse.weight[:, E:].mul_(0.1)
        epochs, lr, per_step = 2, 2e-3, 256
        count = len(flat["x"])
        batch_of = lambda idx: {k: v[idx] for k, v in flat.items()}                    # noqa: E731
    steps = count // per_step if name != "attention" else -(-count // per_step)   # positions: whole batches only
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps, pct_start=0.05)
    for _ in range(epochs):   # each epoch's order drawn as it starts; its batches built one at a time
        for idx in torch.randperm(count, generator=gen).split(per_step)[:steps]:
            ex = batch_of(idx)
            valid = ex["next"] >= 0
            _, loss = step_loss(parts, predict(ex)[valid], ex["next_h"][valid], index[ex["next"][valid]],
                                valid[valid], soft=0.5)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            sched.step()
    return predict


@torch.no_grad()
def acceptance(predict, parts: TargetParts, index: torch.Tensor, replies: list[dict]) -> float:
    """Share of positions where the variant's top-1 is the target's next token (one reply at a time)."""
    hits = total = 0
    for r in replies:
        one = {k: v[None] for k, v in r.items()}
        hits += int((parts.logits(predict(one))[0].argmax(-1) == index[r["next"]]).sum())
        total += len(r["next"])
    return round(hits / total, 4)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=500)
    ap.add_argument("--source", choices=("templates", "target"), default="templates")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mt-bench", default=str(MT_BENCH))
    ap.add_argument("--limit", type=int, help="MT-Bench questions (default all 80)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "head-ceiling")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if not Path(args.mt_bench).is_file():
        ap.error(f"{args.mt_bench}: no such file (MT-Bench questions, evaluation only)")
    tame_glibc_malloc()
    loaded = load_model(resolve("smollm2-135m-instruct"), "q4", forward="specmemo", kernels=load_device("cpu").kernels)
    model, tok = loaded.model, loaded.tokenizer
    model.feature_layers = (EARLY,)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.source == "target":
        prompts = target_written_prompts(model, tok, args.prompts, args.seed)
        print(f"{len(prompts)} prompts written by the target in {time.perf_counter() - t0:.0f} s; e.g. "
              f"{json.dumps(prompts[:3])}", flush=True)
    else:
        prompts = training_prompts(args.prompts, args.seed)
    corpus = corpus_for(model, tok, prompts, 160, 16, args.work / f"{args.source}_{args.prompts}_{args.seed}.safetensors")
    questions = [c.turns[0] for c in load_prompts(args.mt_bench, args.limit)]
    mt = corpus_for(model, tok, questions, 128, 8, args.work / f"mt_bench_{len(questions)}.safetensors")
    train_set = [examples(r) for r in corpus if len(r["reply"]) > 1]
    mt_set = [examples(r) for r in mt if len(r["reply"]) > 1]
    vocab = head_vocab(corpus, 8192)
    index = torch.full((model.cfg.vocab_size,), -100, dtype=torch.long)
    index[vocab] = torch.arange(len(vocab))
    parts = TargetParts(model, vocab)
    print(f"host: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {args.prompts} "
          f"{args.source} prompts (seed {args.seed}), {sum(len(r['x']) for r in train_set)} training positions, "
          f"MT-Bench {sum(len(r['x']) for r in mt_set)} positions", flush=True)
    dense = None
    for name in variants:
        t0 = time.perf_counter()
        if name in ("init", "attention") and dense is None:
            dense = load_model(resolve("smollm2-135m-instruct"), "fp32", forward="specmemo", kernels=load_device("cpu").kernels).model
        predict = train(name, model, dense, parts, index, train_set, args.seed)
        print(json.dumps({"variant": name, "mt_bench_first": acceptance(predict, parts, index, mt_set),
                          "trained_on_first": acceptance(predict, parts, index, train_set[:80]),
                          "seconds": round(time.perf_counter() - t0)}), flush=True)


if __name__ == "__main__":
    from bench.result import recorded

    with recorded("head_ceiling"):
        main()
