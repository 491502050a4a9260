"""Train a draft head (models/draft_head.py) for a target, on the target's own replies.

Two stages, each resumable from its file in the work directory:
  corpus  the target answers training prompts (training/prompts.py) greedily, many at once in a
          continuous pool; every reply token is kept with the hidden state that chose it.
  train   the head learns, regressively over `depth` steps, the target's next hidden state and
          next token from (hidden state, token), teacher-forced on those replies; the last
          `holdout` prompts are never trained on and give the acceptance estimate.

Notation as in the head: H_j is the target's hidden state (before its final norm) at the token
whose logits chose reply token r_j. The head maps (H_j, r_j) to H_{j+1} and r_{j+1}.
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from specmemo.atomic import atomic_write, atomic_write_text
from specmemo.errors import BadInput
from specmemo.decoding.batch import BatchEngine, SequenceDone
from specmemo.decoding.drafters import NoDrafter
from specmemo.decoding.sampling import SamplingConfig
from specmemo.memory.kvstore import KVShape, KVStore
from specmemo.models.draft_head import DraftHead, TargetParts, save_head, unit_rms


@dataclass(frozen=True)
class HeadRecipe:
    """Everything that decides the trained weights (recorded in the head's card)."""
    target: str = "smollm2-135m-instruct"
    dtype: str = "q4"               # the target's weights while it writes the corpus: the ones chat runs
    prompts: int = 3000
    holdout: int = 100              # of those, the last ones: never trained on
    max_new_tokens: int = 160
    gen_batch: int = 16             # rows the target decodes at once while writing the corpus
    vocab: int = 8192               # the head's output: the most frequent reply tokens
    inner: int = 1536               # the head's MLP width
    depth: int = 3                  # regressive steps trained
    epochs: int = 2
    batch: int = 256                # positions per optimizer step
    lr: float = 2e-3
    soft: float = 0.5               # share of each depth's token loss taken from the target's whole
                                    # distribution (KL) rather than its chosen token (cross-entropy)
    seed: int = 0


# -- corpus --------------------------------------------------------------------------------------

@torch.inference_mode()
def write_corpus(model, prompt_ids: list[list[int]], stop: set[int], max_new: int, batch: int,
                 progress=None) -> list[dict]:
    """Greedy replies of the target (our decoder) to each prompt: [{"reply": [m] int64,
    "hidden": [m, E] in the compute dtype}], plus "layers" [m, L, E] (the outputs of
    model.feature_layers) where the model keeps some, in prompt order. progress(n) per
    finished prompt.

    Written by the batch engine's continuous pool (decoding/batch.py) without drafts, `batch` rows
    at once: a row whose reply ended takes the next prompt in the very next forward, each prompt
    prefilled whole, and each row attends over its own keys, so a reply is the target's plain
    greedy decoding. Each token's hidden state is read from the forward that chose it."""
    if not prompt_ids:
        return []
    cfg = model.cfg
    longest = max(map(len, prompt_ids))
    store = KVStore(KVShape(cfg.num_layers, min(batch, len(prompt_ids)), cfg.num_kv_heads, cfg.head_dim,
                            longest + max_new), model.dtype, model.device)
    engine = BatchEngine(model.forward_rows, store, lambda: NoDrafter(model.device), SamplingConfig(), draft_len=0,
                         prefill_chunk=longest, context=longest + max_new, measure_cost=False)
    hidden: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(prompt_ids))}
    layers: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(prompt_ids))}

    def keep_states(step, row: int) -> None:
        n = len(step.tokens)
        hidden[step.sequence].append(model.last_hidden[0, row : row + n].clone())            # [n, E]
        if model.feature_layers:
            layers[step.sequence].append(torch.stack([x[0, row : row + n] for x in model.layer_hidden], 1))

    out: list[dict | None] = [None] * len(prompt_ids)
    for event in engine.run(prompt_ids, max_new, stop, on_step=keep_states):
        if isinstance(event, SequenceDone):
            out[event.index] = {"reply": torch.tensor(event.tokens), "hidden": torch.cat(hidden.pop(event.index))}
            if model.feature_layers:
                out[event.index]["layers"] = torch.cat(layers.pop(event.index))
            if progress:
                progress(1)
    return out


def save_corpus(path: Path, corpus: list[dict], key: dict, seconds: float | None = None) -> None:
    """The corpus, under its key (and the seconds its writing took, for the card of a run that
    reuses it)."""
    import json

    from safetensors.torch import save_file

    tensors = {"reply": torch.cat([c["reply"] for c in corpus]).to(torch.int32),
               "hidden": torch.cat([c["hidden"] for c in corpus]).contiguous(),
               "lengths": torch.tensor([len(c["reply"]) for c in corpus], dtype=torch.int32)}
    if "layers" in corpus[0]:
        tensors["layers"] = torch.cat([c["layers"] for c in corpus]).contiguous()
    meta = {"recipe": json.dumps(key)} | ({"seconds": f"{seconds:.1f}"} if seconds is not None else {})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def corpus_key(recipe: HeadRecipe, prompts: list[str]) -> dict:
    """What decides the corpus: the recipe's generation fields and the prompts themselves (a
    saved corpus is reused only when all match)."""
    import hashlib

    fields = {k: v for k, v in asdict(recipe).items() if k in ("target", "dtype", "max_new_tokens", "gen_batch")}
    return {**fields, "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}


def load_corpus(path: Path, key: dict) -> list[dict] | None:
    import json

    from safetensors import safe_open

    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        if json.loads((f.metadata() or {}).get("recipe", "{}")) != key:
            return None
        reply, hidden, lengths = f.get_tensor("reply").long(), f.get_tensor("hidden"), f.get_tensor("lengths")
        layers = f.get_tensor("layers") if "layers" in f.keys() else None
    out, at = [], 0
    for m in lengths.tolist():
        out.append({"reply": reply[at : at + m], "hidden": hidden[at : at + m]})
        if layers is not None:
            out[-1]["layers"] = layers[at : at + m]
        at += m
    return out


def cached_corpus(path: Path, key: dict, write) -> tuple[list[dict], float | None, bool]:
    """The corpus saved at `path` under `key`, else write() -> corpus, timed and saved there:
    (corpus, the seconds its writing took, whether it was reused)."""
    corpus = load_corpus(path, key)
    if corpus is not None:
        return corpus, corpus_seconds(path), True
    t0 = time.perf_counter()
    corpus = write()
    seconds = time.perf_counter() - t0
    save_corpus(path, corpus, key, seconds)
    return corpus, seconds, False


def corpus_seconds(path: Path) -> float | None:
    """How long the saved corpus took to write (None where its file does not say)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        seconds = (f.metadata() or {}).get("seconds")
    return float(seconds) if seconds is not None else None


# -- training --------------------------------------------------------------------------------------

def head_vocab(corpus: list[dict], size: int) -> torch.Tensor:
    """[Vh] the `size` most frequent reply tokens (ties by id), sorted by id."""
    counts = torch.bincount(torch.cat([c["reply"] for c in corpus]))
    top = torch.argsort(-counts.double() - torch.arange(len(counts)) * 1e-9)[: min(size, int((counts > 0).sum()))]
    return top.sort().values


class Positions:
    """The corpus flattened: reply tokens R [T], hidden states H [T, E] (fp32), the layer outputs
    L [T, L, E] where the corpus kept some (else None), and for each depth d ≥ 1 which positions
    p have p + d inside their own reply."""

    def __init__(self, corpus: list[dict], depth: int):
        self.R = torch.cat([c["reply"] for c in corpus])
        self.H = torch.cat([c["hidden"] for c in corpus]).float()
        self.L = torch.cat([c["layers"] for c in corpus]).float() if "layers" in corpus[0] else None
        left = torch.cat([torch.arange(len(c["reply"]) - 1, -1, -1) for c in corpus])   # tokens after p in its reply
        self.valid = [left >= d for d in range(depth + 1)]                                 # valid[d]: [T] bool

    def starts(self) -> torch.Tensor:
        return self.valid[1].nonzero()[:, 0]


def step_loss(parts: TargetParts, f: torch.Tensor, next_h: torch.Tensor, label: torch.Tensor, valid: torch.Tensor,
              soft: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One draft step's loss, averaged over the valid positions: predicted states f [P, E] against
    the target's next states next_h [P, E] and tokens label [P] (head-vocabulary slots, −100 where
    absent or invalid); the token part (1 − soft) cross-entropy plus soft × KL to the target's
    distribution, plus the distance between unit-RMS states. Returns (logits [P, Vh], loss)."""
    logits = parts.logits(f)                               # [P, Vh]
    token = F.cross_entropy(logits, label, ignore_index=-100) if bool((label >= 0).any()) else logits.sum() * 0
    share = valid.float() / valid.sum().clamp(min=1)       # [P]: the mean over valid positions
    if soft:
        with torch.no_grad():
            target = torch.log_softmax(parts.logits(next_h), dim=-1)                # [P, Vh]
        kl = F.kl_div(torch.log_softmax(logits, dim=-1), target, log_target=True, reduction="none")
        token = (1 - soft) * token + soft * (kl.sum(-1) * share).sum()
    reg = ((unit_rms(f) - unit_rms(next_h)).pow(2).mean(-1) * share).sum()
    return logits, token + reg


def head_losses(head: DraftHead, parts: TargetParts, pos: Positions, p: torch.Tensor, index: torch.Tensor,
                depth: int, soft: float = 0.0, first=None) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Loss over start positions p [P] unrolled `depth` steps, each depth's top-1 hits [P] (False
    where the depth runs past the reply), and depth 1's logits [P, Vh]. index: [V] token -> head
    vocabulary slot, −100 if absent. soft: see HeadRecipe (the target's distribution over the
    head's vocabulary comes from its hidden state, H_q through its own norm and head rows).
    first(pos, p) -> [P, E]: the state the first step starts from (default H_p; head variants in
    bench/head_variants.py start from other layers too)."""
    h, x = first(pos, p) if first else pos.H[p], pos.R[p]
    loss, hits, depth1 = 0.0, [], None
    for d in range(1, depth + 1):
        valid = pos.valid[d][p]
        q = torch.where(valid, p + d, p)                       # a safe index where the reply ended
        f = head.block(h, parts.embed(x))                      # [P, E]
        label = torch.where(valid, index[pos.R[q]], -100)
        logits, step = step_loss(parts, f, pos.H[q], label, valid, soft)
        loss = loss + step / d
        hits.append((logits.argmax(-1) == label) & valid)
        depth1 = logits if depth1 is None else depth1
        h, x = f, pos.R[q]
    return loss, hits, depth1


RANKS = 4   # candidates per node a tree may use: the share the target's token was each, reported


def evaluate(head: DraftHead, parts: TargetParts, pos: Positions, index: torch.Tensor, depth: int,
             first=None) -> dict:
    """Teacher-forced on held-out replies: 'first' = top-1 agreement at depth 1 over all positions
    (the greedy acceptance of a first draft token), 'chain' = at each depth, the share of
    positions whose drafts agreed at every depth so far, 'ranks' = at depth 1, the share where
    the target's token was the head's r-th candidate (a candidate tree's acceptance vector)."""
    p_all = pos.starts()
    agreed, chain, total, ranks = 0, [0] * depth, 0, torch.zeros(RANKS)
    with torch.no_grad():
        for i in range(0, len(p_all), 2048):
            p = p_all[i : i + 2048]
            _, hits, scores = head_losses(head, parts, pos, p, index, depth, first=first)
            # Depth 1: where the target's token ranks among the head's candidates.
            top = scores.topk(RANKS, dim=-1).indices                                  # [P, RANKS]
            ranks += (top == index[pos.R[p + 1]][:, None]).sum(0)
            agreed += int(hits[0].sum())
            run = torch.ones_like(hits[0])
            for d, hit in enumerate(hits):
                run = run & hit
                chain[d] += int(run.sum())
            total += len(hits[0])
    return {"first": round(agreed / total, 4), "chain": [round(c / total, 4) for c in chain],
            "ranks": [round(float(r) / total, 4) for r in ranks], "positions": total}


def train_head(recipe: HeadRecipe, model, corpus: list[dict], progress=None, log=print, *,
               vocab: torch.Tensor | None = None, first: torch.nn.Module | None = None,
               noise: float = 0.0) -> tuple[DraftHead, dict]:
    """Train on all but the last `holdout` replies; returns the head and its evaluation. For
    experiments (bench/head_variants.py): vocab overrides the head's vocabulary; first (pos, p)
    -> [P, E] is the first step's state, its parameters trained along; noise adds uniform noise
    of that size relative to each row's RMS to the first state while training (EAGLE's)."""
    torch.manual_seed(recipe.seed)
    train, held = corpus[: -recipe.holdout], corpus[-recipe.holdout :]
    vocab = head_vocab(train, recipe.vocab) if vocab is None else vocab
    index = torch.full((model.cfg.vocab_size,), -100, dtype=torch.long)
    index[vocab] = torch.arange(len(vocab))
    parts = TargetParts(model, vocab)
    head = DraftHead(model.cfg.hidden_size, recipe.inner, vocab)
    pos, held_pos = Positions(train, recipe.depth), Positions(held, recipe.depth)
    starts = pos.starts()
    if len(starts) == 0:
        raise BadInput("the corpus holds no reply of two tokens or more: nothing to train on")
    batch = min(recipe.batch, len(starts))   # a small corpus (a smoke run) still trains
    steps = recipe.epochs * (len(starts) // batch)
    params = [*head.parameters(), *(first.parameters() if first is not None else ())]
    start = first if first is not None else (lambda pos_, p: pos_.H[p])

    def noisy(pos_, p):
        h = start(pos_, p)
        return h + noise * h.pow(2).mean(-1, keepdim=True).sqrt() * (torch.rand_like(h) * 2 - 1)

    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(recipe.seed)
    step, t0 = 0, time.perf_counter()
    for epoch in range(recipe.epochs):
        order = starts[torch.randperm(len(starts), generator=gen)]
        for i in range(0, len(order) - batch + 1, batch):
            loss, _, _ = head_losses(head, parts, pos, order[i : i + batch], index, recipe.depth, recipe.soft,
                                     first=noisy if noise else first)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            if progress:
                progress(step, steps, float(loss.detach()))
        log(f"epoch {epoch + 1}: held-out {evaluate(head, parts, held_pos, index, recipe.depth, first)}")
    head.requires_grad_(False)
    result = evaluate(head, parts, held_pos, index, recipe.depth, first)
    coverage = float(torch.isin(held_pos.R, vocab).float().mean())
    return head, {**result, "steps": step, "train_seconds": round(time.perf_counter() - t0, 1),
                  "train_positions": len(starts), "vocab_coverage_heldout": round(coverage, 4)}


def card_markdown(card: dict, vocab: int) -> str:
    """The head's card for people: what it was trained on, how long, and how often it is right."""
    r, e = card["recipe"], card["evaluation"]
    seconds = card.get("corpus_seconds")
    written = "" if seconds is None else f" in {seconds:.0f} s"
    if card.get("corpus_reused"):   # this run trained on a corpus an earlier run wrote
        written += " (by an earlier run; this run reused it)"
    return "\n".join([
        f"# Draft head for {r['target']}",
        "",
        "Trained by `specmemo train-draft` (specmemo/training/draft_head.py); the same figures are in the",
        "safetensors file's metadata (`card`).",
        "",
        f"- Data: the target ({r['dtype']} weights) answered {r['prompts']} training prompts greedily (composed from",
        "  templates in specmemo/training/prompts.py; none from MT-Bench or any test set), at most",
        f"  {r['max_new_tokens']} tokens each: {card['corpus_tokens']:,} reply tokens{written}.",
        f"- Head: fused input [2E -> E], SwiGLU MLP of width {r['inner']}, output over the {vocab:,} most frequent",
        f"  reply tokens (at most {r['vocab']:,}; the target's LM-head rows); {card['head_bytes'] / 2**20:.1f} MiB of",
        "  fp32 weights.",
        f"- Training: {e['steps']} steps of {r['batch']} positions ({r['epochs']} epochs, depth {r['depth']}, AdamW,",
        f"  lr {r['lr']}, seed {r['seed']}; token loss {r.get('soft', 0):.0%} KL to the target's distribution, the rest",
        f"  cross-entropy to its token) in {e['train_seconds']:.0f} s; {'this run' if card.get('corpus_reused') else 'whole recipe'} {card['total_seconds'] / 60:.1f} min",
        f"  on {card['host']}, {card['threads']} threads, torch {card['torch']}.",
        f"- Held-out ({r['holdout']} prompts, {e['positions']:,} positions, teacher-forced): first-token acceptance",
        f"  {e['first']:.3f}; all drafts right to depth 1/2/3: {e['chain']}; the target's token was the head's",
        f"  r-th candidate (r = 1..{len(e['ranks'])}): {e['ranks']}; vocabulary coverage {e['vocab_coverage_heldout']:.3f}.",
        "- On MT-Bench: `python bench/head_acceptance.py` (see the README).",
        "",
    ])


def run(recipe: HeadRecipe, out: Path, work: Path, console=None) -> dict:
    """The whole recipe: load the target, write (or reuse) the corpus, train, save the head and
    its card atomically. Returns the card."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from specmemo.budget.devices import load_device
    from specmemo.models.load import load_model
    from specmemo.models.resolve import resolve
    from specmemo.models.text import encode_prompt, stop_ids
    from specmemo.host import cpu_name
    from specmemo.training.prompts import training_prompts

    say = console.print if console else print
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    t_start = time.perf_counter()
    loaded = load_model(resolve(recipe.target), recipe.dtype, forward="specmemo", kernels=load_device("cpu").kernels)
    model, tok = loaded.model, loaded.tokenizer
    corpus_path = work / "corpus.safetensors"
    prompts = training_prompts(recipe.prompts, recipe.seed)
    key = corpus_key(recipe, prompts)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}"))

    def write() -> list[dict]:
        ids = [encode_prompt(tok, p, chat=True) for p in prompts]
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("target writes replies", total=len(ids), info="")
            return write_corpus(model, ids, stop_ids(tok, model), recipe.max_new_tokens, recipe.gen_batch,
                                progress=lambda n: bar.advance(task, n))

    corpus, gen_seconds, reused = cached_corpus(corpus_path, key, write)
    tokens = sum(len(c["reply"]) for c in corpus)
    if reused:
        say(f"corpus: reusing {corpus_path} ({tokens} reply tokens)")
    else:
        say(f"corpus: {tokens} reply tokens in {gen_seconds:.0f} s -> {corpus_path}")
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("training the head", total=None, info="")
        head, result = train_head(recipe, model, corpus,
                                  progress=lambda s, n, loss: bar.update(task, completed=s, total=n,
                                                                         info=f"loss {loss:.3f}"),
                                  log=say)
    card = {"recipe": asdict(recipe), "evaluation": result, "host": cpu_name(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "corpus_seconds": None if gen_seconds is None else round(gen_seconds, 1), "corpus_reused": reused,
            "total_seconds": round(time.perf_counter() - t_start, 1),
            "corpus_tokens": tokens, "head_bytes": head.nbytes()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_head(out, head, card)
    atomic_write_text(out.with_suffix(".md"), card_markdown(card, len(head.vocab)))
    say(f"head: {out} ({head.nbytes() / 2**20:.1f} MiB), held-out first-token acceptance {result['first']:.3f}")
    return card
