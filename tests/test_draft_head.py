"""The draft head (models/draft_head.py): trained on a tiny model's own replies by the real
training code, then drafting inside the engine. Exactness holds whatever the head proposes."""

import functools

import pytest
import torch

from specmemo.budget import footprint as fp
from specmemo.decoding.drafters import HeadDrafter, LookupHeadDrafter, NoDrafter
from specmemo.decoding.engine import Engine
from specmemo.decoding.sampling import SamplingConfig
from specmemo.errors import BadInput
from specmemo.memory.kvstore import KVShape, KVStore
from specmemo.models.draft_head import DraftHead, RunningHead, TargetParts, load_head, save_head
from specmemo.training.draft_head import HeadRecipe, train_head, write_corpus
from tests.tiny import VOCAB, own_model, run, tiny

TARGET = tiny(3, scale=4.0)


@functools.cache
def trained():
    """A head trained on the tiny target's greedy replies to 24 random prompts (the last 4 held out)."""
    own = own_model(TARGET())
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (6 + i % 2,), generator=gen).tolist() for i in range(24)]
    corpus = write_corpus(own, prompts, stop=set(), max_new=40, batch=8)
    recipe = HeadRecipe(vocab=64, inner=64, holdout=4, epochs=25, batch=64, lr=3e-3, depth=3)
    head, result = train_head(recipe, own, corpus, log=lambda *_: None)
    return head, result, corpus, prompts


def engine(drafter: str, k: int = 4, sampling=SamplingConfig(), seed=0):
    own = own_model(TARGET())
    cfg = own.cfg
    store = KVStore(KVShape(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, 300), own.dtype, "cpu")
    gen = torch.Generator().manual_seed(seed)
    kinds = {"head": HeadDrafter, "ngram+head": LookupHeadDrafter}
    d = kinds[drafter](own, RunningHead.for_machine(trained()[0], own), sampling, gen) if drafter in kinds \
        else NoDrafter("cpu")
    return Engine(own, store, d, sampling, draft_len=0 if drafter == "none" else k, prefill_chunk=16,
                  context=300, generator=gen)


def test_the_corpus_keeps_each_reply_with_the_hidden_state_that_chose_it():
    own = own_model(TARGET())
    head, _, corpus, _ = trained()
    prompt = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(0)).tolist()
    # Replies were written 8 rows at a time; each is the target's plain greedy decoding all the same.
    plain = run(engine("none"), prompt, max_new=40)[0]
    assert len(corpus) == 24 and all(len(c["reply"]) == 40 for c in corpus)
    assert corpus[0]["hidden"].shape == (40, own.cfg.hidden_size)
    reply = write_corpus(own, [prompt], stop=set(), max_new=40, batch=1)[0]
    assert reply["reply"].tolist() == plain[:40]
    # H_0 is the hidden state at the prompt's last token: the target's logits from it chose r_0.
    logits = (torch.nn.functional.rms_norm(reply["hidden"][0], (own.cfg.hidden_size,), own.norm, own.cfg.rms_eps)
              @ own.head)
    assert int(logits.argmax()) == reply["reply"][0]
    assert corpus[0]["reply"].dtype == torch.int64


def test_training_learns_the_targets_next_tokens():
    head, result, _, _ = trained()
    untrained = DraftHead(head.fuse.out_features, 64, head.vocab)
    own = own_model(TARGET())
    from specmemo.training.draft_head import Positions, evaluate

    index = torch.full((VOCAB,), -100, dtype=torch.long)
    index[head.vocab] = torch.arange(len(head.vocab))
    before = evaluate(untrained, TargetParts(own, head.vocab), Positions(trained()[2][-4:], 3), index, 3)
    assert result["first"] > before["first"] + 0.2, (result, before)
    assert result["chain"][0] >= result["chain"][1] >= result["chain"][2]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_with_the_head_equals_plain_decoding(k):
    gen = torch.Generator().manual_seed(5)
    for i in range(3):
        prompt = torch.randint(0, VOCAB, (5 + i,), generator=gen).tolist()
        plain, _ = run(engine("none"), prompt, max_new=48)
        spec, stats = run(engine("head", k), prompt, max_new=48)
        assert spec == plain
        assert stats.drafted_tokens > 0


def test_lookup_then_head_drafts_both_ways_and_equals_plain_decoding():
    """ngram+head: where the conversation repeats, a lookup chain (a step without ranks); elsewhere
    the head's tree (a step with them). Greedy output is plain decoding's either way."""
    from specmemo.decoding.events import Step

    gen = torch.Generator().manual_seed(9)
    for i in range(3):
        # A prompt that repeats itself (lookup finds matches) after one the head was trained on.
        piece = torch.randint(0, VOCAB, (6,), generator=gen).tolist()
        prompt = trained()[3][i] + piece + piece
        plain, _ = run(engine("none"), prompt, max_new=48)
        steps = [ev for ev in engine("ngram+head", 4).generate(prompt, 48) if isinstance(ev, Step)]
        assert [t for step in steps for t in step.tokens][:48] == plain
        assert any(step.drafted and not step.ranks for step in steps), "no lookup chain was verified"
        assert any(step.ranks for step in steps), "the head never drafted a tree"


def test_the_head_drafts_tokens_the_target_accepts():
    """On a prompt it was trained on, the head follows the target: this fails when the engine
    hands the head another row's hidden state than the one that chose the newest token."""
    prompt = trained()[3][0]
    _, stats = run(engine("head", 4), prompt, max_new=40)
    assert stats.accepted_tokens / stats.drafted_tokens > 0.5


def test_the_head_starts_from_the_state_that_chose_the_newest_token():
    """After each step the drafter holds the target's hidden state at the token before the newest
    one (whose logits chose it), wherever the verification's rejection fell."""
    own = own_model(TARGET())
    e = engine("head", 4)
    for n, step in enumerate(e.generate(trained()[3][1], 30)):
        if n < 3 or not hasattr(step, "accepted"):
            continue
        fresh = KVStore(KVShape(own.cfg.num_layers, 1, own.cfg.num_kv_heads, own.cfg.head_dim, 300), own.dtype, "cpu")
        own(fresh, torch.tensor([e.tokens[:-1]]), 1)
        assert torch.allclose(e.drafter.hidden, own.last_hidden[0, -1], atol=1e-4), n


def test_sampling_with_the_head_is_reproducible_and_uses_the_heads_q():
    cfg = SamplingConfig(temperature=0.9, top_k=20)
    prompt = [1, 2, 3, 4, 5]
    a, _ = run(engine("head", 3, cfg, seed=7), prompt, max_new=40)
    b, _ = run(engine("head", 3, cfg, seed=7), prompt, max_new=40)
    assert a == b
    e = engine("head", 3, cfg, seed=7)
    run(e, prompt, max_new=8)
    assert e.shapes is not None   # sampling verifies candidate trees too (verify_tree_sampling)
    q = e.drafter.propose(e.tokens, 3).q
    assert q.shape == (3, VOCAB) and torch.allclose(q.sum(-1), torch.ones(3))
    off_vocab = torch.ones(VOCAB, dtype=torch.bool)
    off_vocab[e.drafter.vocab] = False
    assert float(q[:, off_vocab].sum()) == 0.0  # the head proposes only its own vocabulary


def test_a_saved_head_loads_back_identically(tmp_path):
    head, result, _, _ = trained()
    path = tmp_path / "head.safetensors"
    save_head(path, head, {"evaluation": result})
    loaded, card = load_head(path)
    assert card["evaluation"] == result
    for (name, a), (_, b) in zip(head.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert [p.name for p in tmp_path.iterdir()] == ["head.safetensors"]  # no temp file left


def test_a_file_that_is_not_a_head_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(BadInput, match="not a draft head file"):
        load_head(bad)


def test_the_plan_counts_the_heads_weights_rows_and_logits():
    # Hand-worked: E = 576, I = 1536, Vh = 8192; matrices, rows and norms in the drafting dtype.
    ids = 8 * 8192
    matrices, rows, norms = 2 * 576 * 576 + 3 * 1536 * 576, 8192 * 576, 4 * 576
    assert fp.draft_head_bytes(576, 1536, 8192) == 4 * (matrices + rows + norms) + ids == 32_220_160
    assert fp.draft_head_bytes(576, 1536, 8192, "bf16") == 2 * (matrices + rows + norms) + ids == 16_142_848
    from specmemo.budget.plan import PlanRequest, make_plan
    from tests.tiny import arch_of

    req = PlanRequest(target=arch_of(TARGET()), draft=None, drafter="head", context=64, draft_len=4, draft_window=0,
                      dtype="fp32", head=(64, 64, 32), sampling=False)
    plan = make_plan(req)
    assert plan.components["draft_weights"] == fp.draft_head_bytes(64, 64, 32)
    assert make_plan(req.with_(head_dtype="bf16")).components["draft_weights"] == fp.draft_head_bytes(64, 64, 32, "bf16")
    no_head = make_plan(req.with_(drafter="ngram", head=None))
    assert plan.components["logits"] - no_head.components["logits"] == 32 * 4


@pytest.mark.parametrize("dtype,packed,int8", [(torch.float32, False, False), (torch.bfloat16, False, False),
                                               (torch.bfloat16, True, False), (torch.bfloat16, False, True)])
def test_the_running_head_drafts_as_the_trained_one_and_weighs_what_the_plan_counts(dtype, packed, int8):
    """RunningHead (what drafting runs) against the trained module it came from: the same state
    and logits in fp32, within half precision's rounding in bf16 (packed or not) and int8's, the
    same top token on nearly every held-out position; its bytes are the plan's."""
    from specmemo.models.quant import packs

    from specmemo.budget.devices import load_device

    if packed and not packs(torch.bfloat16, "head", load_device("cpu").kernels):
        pytest.skip("this machine does not pack a bf16 head")
    head, _, corpus, _ = trained()
    own = own_model(TARGET())
    running = RunningHead(head, own, dtype, packed, int8)
    parts = TargetParts(own, head.vocab)
    h = torch.cat([c["hidden"] for c in corpus[-4:]]).float()                     # [n, E]
    x = torch.cat([c["reply"] for c in corpus[-4:]])                             # [n]
    want_f = head.block(h, parts.embed(x))
    want = parts.logits(want_f)
    f, got = running.step(h, x)
    tol = 1e-5 if dtype == torch.float32 else 0.08 if int8 else 0.05
    assert torch.allclose(f.float(), want_f, atol=tol * want_f.abs().max()), (f.float() - want_f).abs().max()
    assert torch.allclose(got, want, atol=tol * want.abs().max()), (got - want).abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95
    name = "int8" if int8 else "fp32" if dtype == torch.float32 else "bf16"
    assert running.nbytes() == fp.draft_head_bytes(head.fuse.out_features, head.down.in_features, len(head.vocab), name)


def test_batched_rows_draft_from_their_own_hidden_states():
    """The batch engine with one head shared by its rows: each row's tokens equal plain decoding,
    and its drafts are accepted as often as when it runs alone: this fails when a row's head reads
    another row's (or another position's) hidden state from the packed forward."""
    from specmemo.decoding.batch import BatchEngine, SequenceDone

    own = own_model(TARGET())
    head = trained()[0]
    prompts = trained()[3][:3] + [trained()[3][5][:4]]
    alone = [run(engine("head", 4), p, max_new=30) for p in prompts]
    cfg = own.cfg
    store = KVStore(KVShape(cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim, 300), own.dtype, "cpu")
    shared = RunningHead.for_machine(head, own)
    batch = BatchEngine(own.forward_rows, store, lambda: HeadDrafter(own, shared, SamplingConfig()),
                        SamplingConfig(), draft_len=4, prefill_chunk=16, context=300, measure_cost=False)
    done = {ev.index: ev for ev in batch.run(prompts, 30) if isinstance(ev, SequenceDone)}
    assert [done[i].tokens for i in range(4)] == [tokens for tokens, _ in alone]
    # All drafts priced alike (measure_cost=False, a flat curve): each row drafts and accepts
    # exactly what it does alone.
    assert [done[i].stats.accepted_tokens for i in range(4)] == [stats.accepted_tokens for _, stats in alone]
    assert [done[i].stats.drafted_tokens for i in range(4)] == [stats.drafted_tokens for _, stats in alone]
    assert sum(stats.accepted_tokens for _, stats in alone) > 0


def test_corpus_keeps_the_layers_a_head_variant_reads(tmp_path):
    """With feature_layers set, each reply token keeps those layers' outputs at the row that chose
    it: the last layer's output is the hidden state itself, and the corpus file round-trips them."""
    from specmemo.training.draft_head import load_corpus, save_corpus

    own = own_model(TARGET())
    last = own.cfg.num_layers - 1
    own.feature_layers = (0, last)
    prompts = [torch.randint(3, VOCAB, (6,)).tolist() for _ in range(3)]
    corpus = write_corpus(own, prompts, stop=set(), max_new=12, batch=8)
    for c in corpus:
        assert c["layers"].shape == (len(c["reply"]), 2, own.cfg.hidden_size)
        assert torch.equal(c["layers"][:, 1], c["hidden"])
        assert not torch.equal(c["layers"][:, 0], c["hidden"])
    save_corpus(tmp_path / "c.safetensors", corpus, {"k": 1})
    back = load_corpus(tmp_path / "c.safetensors", {"k": 1})
    assert all(torch.equal(a["layers"], b["layers"]) for a, b in zip(corpus, back))


def test_the_pool_refills_rows_and_each_reply_is_plain_greedy_decoding():
    """Prompts of different lengths, replies that end at a stop token at different steps, fewer
    rows than prompts: a row that finished takes the next prompt while the others decode, and
    every reply is that prompt's plain greedy decoding, with the hidden states it gets alone, in
    prompt order."""
    own = own_model(TARGET())
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (4 + 3 * i % 7,), generator=gen).tolist() for i in range(7)]
    plain = [run(engine("none"), p, max_new=30)[0] for p in prompts]
    # a stop token that ends the first reply mid-way (its first occurrence), the others wherever it occurs
    first_end = next(j for j in range(5, 30) if plain[0][j] not in plain[0][:j]) + 1
    stop = {plain[0][first_end - 1]}
    corpus = write_corpus(own, prompts, stop=stop, max_new=30, batch=3)
    alone = [write_corpus(own, [p], stop=stop, max_new=30, batch=1)[0] for p in prompts]
    lengths = []
    for c, a, p in zip(corpus, alone, plain):
        ends = [j + 1 for j, t in enumerate(p) if t in stop]
        assert c["reply"].tolist() == p[: ends[0] if ends else 30]
        # fp32 products round a little differently in a packed forward (half precision is row-exact)
        torch.testing.assert_close(c["hidden"], a["hidden"], rtol=1e-4, atol=1e-5)
        lengths.append(len(c["reply"]))
    assert lengths[0] == first_end < 30 and len(set(lengths)) > 1   # rows really did finish at different steps


def test_evaluation_runs_over_more_positions_than_one_chunk():
    """evaluate() walks held-out positions in chunks of 2,048; its first-token agreement over
    several chunks equals the share of depth-1 hits over all positions at once."""
    from specmemo.training.draft_head import Positions, evaluate, head_losses

    own = own_model(TARGET())
    head, _, _, _ = trained()
    gen = torch.Generator().manual_seed(5)
    E = own.cfg.hidden_size
    corpus = [{"reply": torch.randint(0, VOCAB, (m,), generator=gen), "hidden": torch.randn(m, E, generator=gen)}
              for m in (1500, 1400, 900)]                       # 3,797 positions: two chunks
    index = torch.full((VOCAB,), -100, dtype=torch.long)
    index[head.vocab] = torch.arange(len(head.vocab))
    parts = TargetParts(own, head.vocab)
    pos = Positions(corpus, 2)
    result = evaluate(head, parts, pos, index, 2)
    _, hits, _ = head_losses(head, parts, pos, pos.starts(), index, 2)
    assert result["positions"] == len(pos.starts()) > 2048
    assert result["first"] == round(float(hits[0].float().mean()), 4)
