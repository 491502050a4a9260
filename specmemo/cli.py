"""The `specmemo` command: plan, generate, chat, profile, train-draft.

Commands stay thin: they parse options, call one library function, and render its result.
torch and transformers are imported inside the commands that need them, so `plan` is instant.
"""

import contextlib
import functools
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from specmemo.budget.units import count
from specmemo.errors import BadInput, BudgetExceeded, SpecmemoError

app = typer.Typer(
    help="Speculative decoding that fits in the memory you have.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
class Terminal(Console):
    """rich's Console, except that a reader closing early ends the command quietly with exit 0
    (rich's own handler exits 1)."""

    def on_broken_pipe(self) -> None:
        raise typer.Exit(reader_closed())


err = Terminal(stderr=True, highlight=False)

TargetOpt = Annotated[str, typer.Option("--target", "-t", help="Alias (see profiles/models), HF directory, .gguf file or hub id.")]
DraftOpt = Annotated[str, typer.Option("--draft", "-d", help="Draft model (alias, directory, .gguf, hub id), or 'head' (the target's trained draft head, see train-draft), 'ngram' (lookup in the conversation, no weights), 'ngram+head' (lookup where the conversation repeats itself, the head elsewhere), 'none', or 'auto' (whichever of these measured fastest here, see profile --save-profile).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="Device profile: cpu, cuda (both measured now) or a name in profiles/devices.")]
BudgetOpt = Annotated[Optional[str], typer.Option("--budget", help="Memory budget, e.g. 8GiB, 800MB, 8G or bytes. Defaults to the device's memory.")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="Weight dtype: fp32, bf16, fp16, q4 (a GGUF's Q4_0/Q4_1 weights run packed, bf16 compute; CPU only) or q8 (planned, not run yet). Default: q4 for a 4-bit GGUF on a CPU, else the device's (fp32 on a CPU, bf16 on CUDA).")]
ForwardOpt = Annotated[str, typer.Option("--forward", help="auto: specmemo's own decoder for the Llama family, else the transformers adapter; or force one: specmemo, transformers.")]
GraphsOpt = Annotated[bool, typer.Option("--cuda-graphs/--no-cuda-graphs", help="On a GPU, replay the own decoder's decode and verify steps as CUDA graphs.")]
KvDtypeOpt = Annotated[Optional[str], typer.Option("--kv-dtype", help="KV-cache dtype: fp32, bf16 or fp16 (narrower than --dtype halves KV memory). Default: --dtype.")]
DraftDtypeOpt = Annotated[Optional[str], typer.Option("--draft-dtype", help="The draft model's dtype. Default: --dtype.")]


def check_sampling(temperature: float, top_p: float) -> None:
    if not math.isfinite(temperature) or temperature < 0:
        raise typer.BadParameter(f"--temperature must be a number ≥ 0, got {temperature}")
    if not 0 < top_p <= 1:   # NaN fails this too
        raise typer.BadParameter(f"--top-p must be in (0, 1], got {top_p}")


def check_writable(path: Path, option: str) -> None:
    """A file the command will write at the end of its work, checked before the work starts."""
    if path.is_dir():
        raise BadInput(f"{option} {path} is a directory; give a file name")
    parent = path.parent
    while not parent.exists():   # directories the command would create
        parent = parent.parent
    try:   # a real write: permission bits say nothing to root, nor about a read-only file system
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".specmemo-probe-"):
            pass
    except OSError as e:
        raise BadInput(f"{option} {path}: cannot write in {parent} ({e.strerror or e})") from None


@app.callback()
def root():
    """Speculative decoding that fits in the memory you have. Set SPECMEMO_DEBUG=1 for tracebacks."""


def describe(e: Exception) -> str:
    """An unexpected error as one line in the domain's words: the file and what went wrong with
    it, without Python's exception names (SPECMEMO_DEBUG=1 shows those, with the traceback)."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror.lower()}" if e.filename else e.strerror.lower()
    text = (str(e).strip().splitlines() or [""])[0]
    return text or f"unexpected {type(e).__name__} (run with SPECMEMO_DEBUG=1 for the traceback)"


def domain_errors(fn):
    """The one place where domain errors become a single line on stderr and an exit code."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
            sys.stdout.flush()   # buffered output meets a closed pipe here, not at interpreter exit
            return result
        except (typer.Exit, typer.Abort):
            raise
        except BrokenPipeError:   # here, before click turns it into exit 1
            raise typer.Exit(reader_closed()) from None
        except SpecmemoError as e:
            if os.environ.get("SPECMEMO_DEBUG") == "1":
                raise
            err.print(f"error: {e}", soft_wrap=True, markup=False)
            raise typer.Exit(e.exit_code) from None
        except (OSError, ValueError, RuntimeError) as e:
            if os.environ.get("SPECMEMO_DEBUG") == "1":
                raise
            err.print(f"error: {describe(e)}", soft_wrap=True, markup=False)
            raise typer.Exit(1) from None
    return wrapper


@app.command()
@domain_errors
def plan(
    target: TargetOpt = "smollm2-135m-instruct",
    draft: DraftOpt = "auto",
    device: DeviceOpt = "cpu",
    budget: BudgetOpt = None,
    context: Annotated[Optional[int], typer.Option("--context", "-n", help="Context tokens to hold. Default: the largest that fits.")] = None,
    draft_len: Annotated[Optional[int], typer.Option("--draft-len", "-k", help="Draft tokens per step (k). Default 5.")] = None,
    draft_window: Annotated[Optional[int], typer.Option("--draft-window", "-w", help="Tokens the draft model's KV cache keeps (W). Default min(context, 1024).")] = None,
    dtype: DtypeOpt = None,
    kv_dtype: KvDtypeOpt = None,
    draft_dtype: DraftDtypeOpt = None,
    batch: Annotated[int, typer.Option("--batch", help="Sequences decoded together: one KV row each (generate --prompts --batch runs it with n-gram, head or no drafts).")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
):
    """Plan memory for a target and draft: every component, what fits, the lower bound and the speedup budget.

    On a CPU the budget is the whole process's resident memory (the plan counts the interpreter
    and libraries as process_baseline); on CUDA, device memory including the CUDA context.
    Exits 0 when the request fits, 3 when it does not (2: a usage error). A plan the engine cannot
    run yet (a batch drafting with a model, q8, int8/fp8) is still planned, and marked "not runnable yet".
    """
    from specmemo.budget.units import parse_size
    from specmemo.models.resolve import plan_pair, resolve_pair
    from specmemo.render.plan_table import render_plan

    if batch < 1:
        raise typer.BadParameter(f"--batch must be ≥ 1, got {batch}")

    report = plan_pair(
        resolve_pair(target, draft), device=device, budget=parse_size(budget) if budget else None,
        context=context, draft_len=draft_len, draft_window=draft_window, dtype=dtype, kv_dtype=kv_dtype,
        draft_dtype=draft_dtype, batch=batch, calibrated=True,
    )
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        render_plan(report, Terminal())
    if not report.fits:
        err.print(f"error: {report.refusal()}", soft_wrap=True, markup=False)
        raise typer.Exit(BudgetExceeded.exit_code)


@app.command()
@domain_errors
def generate(
    target: TargetOpt = "smollm2-135m-instruct",
    draft: DraftOpt = "auto",
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt text; '-' reads standard input.")] = None,
    prompts: Annotated[Optional[Path], typer.Option(
        "--prompts", help="Many prompts, batched: a file with one prompt per line, or JSONL with a \"prompt\" field "
                          "(MT-Bench records: the first turn). Prints one JSON line per prompt, in input order.")] = None,
    batch: Annotated[Optional[int], typer.Option(
        "--batch", "-b", help="Sequences decoded together with --prompts (each its own KV row; a finished "
                              "one's row takes the next prompt). Default: the most the budget holds, up to 8.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the target's chat template.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-m", help="Most tokens to generate.")] = 128,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep going past end-of-sequence tokens.")] = False,
    temperature: Annotated[float, typer.Option("--temperature", help="0 is greedy; above 0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold (1 = off).")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the k most likely tokens (0 = off).")] = 0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for reproducible sampling.")] = None,
    budget: BudgetOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = None,
    kv_dtype: KvDtypeOpt = None,
    draft_dtype: DraftDtypeOpt = None,
    context: Annotated[Optional[int], typer.Option("--context", help="Planned context. Default: prompt + max new tokens.")] = None,
    draft_len: Annotated[Optional[int], typer.Option("--draft-len", "-k", help="Most draft tokens per step.")] = None,
    draft_window: Annotated[Optional[int], typer.Option("--draft-window", help="Tokens kept in the draft model's KV cache.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow pickled .bin weights (they can run code).")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run model code from the model's repository.")] = False,
    forward: ForwardOpt = "auto",
    cuda_graphs: GraphsOpt = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the text and measurements.")] = False,
):
    """Generate once from a prompt with speculative decoding; stream the text, or print JSON.

    tok/s counts decoding only; the prefill has its own rate (prefill_tokens_per_s in --json).
    With --prompts, every prompt runs through the batch engine: one JSON line each on stdout, a
    summary (tok/s over the whole run, peak memory against the plan) on stderr, or as the last
    JSON line with --json.
    """
    from specmemo.budget.units import parse_size
    from specmemo.decoding.sampling import SamplingConfig
    from specmemo.generate import generate as run_generate
    from specmemo.pipeline import RunRequest

    if (prompt is None) == (prompts is None):
        raise typer.BadParameter("give either --prompt or --prompts")
    if prompts is None and batch is not None:
        raise typer.BadParameter("--batch goes with --prompts")
    if batch is not None and batch < 1:
        raise typer.BadParameter(f"--batch must be ≥ 1, got {batch}")

    if prompt == "-":
        sys.stdin.reconfigure(errors="surrogateescape")  # generate() replaces bytes that are not UTF-8
        prompt = sys.stdin.read()
    check_sampling(temperature, top_p)
    if top_k < 0:
        raise typer.BadParameter(f"--top-k must be ≥ 0, got {top_k}")
    run = RunRequest(target, draft, device=device, budget=parse_size(budget) if budget else None, context=context,
                     draft_len=draft_len, draft_window=draft_window, dtype=dtype, kv_dtype=kv_dtype,
                     draft_dtype=draft_dtype, sampling=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                                                                      seed=seed),
                     allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, forward=forward,
                     cuda_graphs=cuda_graphs, batch=batch, calibrated=True)
    if prompts is not None:
        from specmemo.generate import generate_batch, read_prompts

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        texts = read_prompts(str(prompts))
        with Progress(TextColumn("prompts"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                      transient=True) as bar:
            task = bar.add_task("prompts", total=len(texts))

            def emit(line: dict) -> None:
                print(json.dumps(line), flush=True)   # each line as soon as it is in order: Ctrl-C loses none
                bar.advance(task)

            _, summary = generate_batch(run, texts, chat=chat, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos,
                                        on_sequence=emit)
        if as_json:
            print(json.dumps({"summary": summary.to_json()}))
        else:
            err.print(
                f"[dim]{count(summary.prompts, 'prompt')}, batch {summary.batch}: {count(summary.new_tokens, 'token')} in "
                f"{summary.seconds:.1f} s, {summary.tokens_per_s:.1f} tok/s ({summary.drafter} drafts), generation "
                f"peak {summary.generation_peak_bytes / 2**20:.1f} MiB (plan "
                f"{summary.predicted_generation_bytes / 2**20:.1f} MiB), process peak "
                f"{summary.process_peak_bytes / 2**20:.0f} MiB of {summary.budget_bytes / 2**20:.0f} MiB budget[/]")
        return

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = run_generate(run, prompt, chat=chat, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos,
                          on_text=None if as_json else stream)
    if as_json:
        print(json.dumps(result.to_json()))
    else:
        print()
        err.print(
            f"[dim]{count(result.stats.new_tokens, 'token')}, {result.stats.tokens_per_s:.1f} tok/s (prefill "
            f"{count(result.prompt_tokens, 'token')} at {result.stats.prefill_tokens_per_s:.0f} tok/s), accepted "
            f"{result.stats.accepted_tokens}/{result.stats.drafted_tokens} "
            f"drafted, generation peak {result.generation_peak_bytes / 2**20:.1f} MiB (plan "
            f"{result.predicted_generation_bytes / 2**20:.1f} MiB), process peak "
            f"{result.process_peak_bytes / 2**20:.0f} MiB of {result.budget_bytes / 2**20:.0f} MiB budget[/]"
        )


@app.command()
@domain_errors
def chat(
    target: TargetOpt = "smollm2-135m-instruct",
    draft: DraftOpt = "auto",
    budget: BudgetOpt = None,
    device: DeviceOpt = "cpu",
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt. Default: the model's own.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-m", help="Most tokens per reply.")] = 512,
    temperature: Annotated[float, typer.Option("--temperature", help="0 is greedy; above 0 samples.")] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold (1 = off).")] = 0.9,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for reproducible sampling.")] = None,
    dtype: DtypeOpt = None,
    kv_dtype: KvDtypeOpt = None,
    draft_dtype: DraftDtypeOpt = None,
    context: Annotated[Optional[int], typer.Option("--context", help="Context tokens. Default: the largest the budget holds.")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Show speed, acceptance and memory after each reply.")] = False,
    json_log: Annotated[Optional[Path], typer.Option("--json-log", help="Append one JSON line per turn to this file.")] = None,
    forward: ForwardOpt = "auto",
    cuda_graphs: GraphsOpt = True,
):
    """Chat in the terminal with speculative decoding, within a memory budget.

    With no options: SmolLM2-135M-Instruct, the drafter measured fastest on this machine (its draft
    head or n-gram lookup, see --draft auto), and a budget of the memory available now. The budget bounds the whole process: every turn's peak is checked against it. Type /help,
    /stats, /save FILE, /reset or /exit. Ctrl-C stops a reply (or a long prefill); Ctrl-D quits.
    When stdin is not a terminal, each line is one turn.
    """
    from specmemo.budget.units import parse_size
    from specmemo.chat.session import ChatSession, smallest_context
    from specmemo.chat.terminal import ChatTerminal
    from specmemo.decoding.sampling import SamplingConfig
    from specmemo.models.load import load_tokenizer
    from specmemo.models.resolve import resolve_pair
    from specmemo.pipeline import RunRequest, open_pipeline

    check_sampling(temperature, top_p)
    if max_new_tokens < 1:
        raise typer.BadParameter(f"--max-new-tokens must be ≥ 1, got {max_new_tokens}")
    size = parse_size(budget) if budget else None
    # Opened before the model loads, so a bad path costs no waiting; line-buffered: a crash loses nothing.
    log = json_log.open("a", buffering=1) if json_log else None
    try:
        with err.status("loading models…") if err.is_terminal else contextlib.nullcontext():
            refs = resolve_pair(target, draft)
            tokenizer = load_tokenizer(refs[0])
            least = smallest_context(tokenizer, system)
            if context is not None and context < least:
                raise typer.BadParameter(f"--context {context} cannot hold a message and a reply: a chat needs "
                                         f"at least {least} tokens")
            # A budget whose context cannot hold a message and a reply is refused now (exit 3).
            pipeline = open_pipeline(RunRequest(
                target, draft, device=device, budget=size, context=context, dtype=dtype, kv_dtype=kv_dtype,
                draft_dtype=draft_dtype, forward=forward, cuda_graphs=cuda_graphs,
                sampling=SamplingConfig(temperature=temperature, top_p=top_p, seed=seed), calibrated=True),
                min_context=least, refs=refs, tokenizer=tokenizer)
        ChatTerminal(ChatSession(pipeline, system, max_new_tokens), Terminal(highlight=False), stats, log, err).run()
    finally:
        if log:
            log.close()


@app.command()
@domain_errors
def profile(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for report.json, report.md and the plots.")],
    target: TargetOpt = "smollm2-135m-instruct",
    draft: DraftOpt = "auto",
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="MT-Bench-format JSONL. Default: the shipped prompts/default.jsonl.")] = None,
    turns: Annotated[int, typer.Option("--turns", help="1, or 2: turn 2 sees each engine's own turn-1 answer.")] = 2,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use the first N conversations.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-m", help="New tokens per turn, for every engine.")] = 128,
    budget: BudgetOpt = None,
    engines: Annotated[Optional[str], typer.Option("--engines", help="Comma-separated: specmemo, specmemo-ar, hf-ar, hf-ar-cached, hf-lookup, hf-assisted, llama.cpp (needs the llama extra).")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="fp32, bf16, fp16, or q4 (a 4-bit GGUF target run packed; the transformers baselines then run fp32). Default: what chat and generate run (q4 for a 4-bit GGUF on a CPU, else fp32).")] = None,
    kv_dtype: KvDtypeOpt = None,
    draft_dtype: DraftDtypeOpt = None,
    save_profile: Annotated[bool, typer.Option("--save-profile", help="Record measured α, c and the target's verification cost curve (its forward over 1..16 tokens, timed after the runs) in profiles/pairs/, for `plan` and the engine's draft length.")] = False,
    batch: Annotated[Optional[str], typer.Option("--batch", help="Comma-separated batch sizes (e.g. 1,2,4,8): throughput and latency of each prompt's first turn against batch size, with and without drafts, beside transformers' batched generate (engines: specmemo, specmemo-ar, hf-batch).")] = None,
):
    """Profile speed, memory and acceptance against Hugging Face generate, each engine in its own process.

    Writes report.json, report.md and PNG plots to --out. All engines decode greedily with the same
    token limits; outputs are compared token for token with hf-ar (with --batch: with the same
    engine at batch 1).
    """
    from specmemo.budget.devices import default_weights, load_device
    from specmemo.budget.units import parse_size
    from specmemo.budget.footprint import dtype_bytes
    from specmemo.models.resolve import resolve_pair
    from specmemo.profiling.run import profile as run_profile

    if max_new_tokens < 1:
        raise typer.BadParameter("--max-new-tokens must be ≥ 1")
    if limit is not None and limit < 1:
        raise typer.BadParameter(f"--limit must be ≥ 1 (leave it out for every conversation), got {limit}")
    if turns not in (1, 2):
        raise typer.BadParameter(f"--turns must be 1 or 2, got {turns}")
    t, d, _ = resolve_pair(target, draft)
    dtype, draft_dtype = default_weights(load_device("cpu"), t.packed_q4, d.packed_q4 if d else None, dtype,
                                         draft_dtype)   # as chat and generate do
    dtype = dtype or "fp32"
    for name in (dtype, kv_dtype, draft_dtype):   # a bad name fails here (as in plan), not in an engine's process
        if name is not None:
            dtype_bytes(name)
    if batch is not None:
        from specmemo.profiling.batch import batch_profile

        try:
            sizes = [int(b) for b in batch.split(",") if b.strip()]
        except ValueError:
            raise typer.BadParameter(f"--batch takes comma-separated integers, got {batch!r}") from None
        batch_profile(target, draft, out, batches=sizes, prompts=str(prompts) if prompts else None, limit=limit,
                      max_new_tokens=max_new_tokens, budget=parse_size(budget) if budget else None, dtype=dtype,
                      kv_dtype=kv_dtype, engines=[e.strip() for e in engines.split(",")] if engines else None)
        Terminal().print((out / "report.md").read_text(), markup=False, highlight=False)
        return
    report = run_profile(target, draft, out, prompts=str(prompts) if prompts else None, turns=turns, limit=limit,
                         max_new_tokens=max_new_tokens, budget=parse_size(budget) if budget else None,
                         engines=[e.strip() for e in engines.split(",")] if engines else None, dtype=dtype,
                         kv_dtype=kv_dtype, draft_dtype=draft_dtype, save_profile=save_profile)
    Terminal().print((out / "report.md").read_text(), markup=False, highlight=False)
    if report.get("saved_profile"):
        err.print(f"saved the measured pair profile to {report['saved_profile']}")


@app.command("train-draft")
@domain_errors
def train_draft(
    target: TargetOpt = "smollm2-135m-instruct",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write the head (safetensors). Default: specmemo/heads/<target>.safetensors, the one `--draft head` uses.")] = None,
    work: Annotated[Path, typer.Option("--work", help="Directory for the corpus of the target's replies (reused by a later run with the same corpus settings).")] = Path("out/train-draft"),
    prompts: Annotated[int, typer.Option("--prompts", help="Training prompts the target answers (composed from templates; none from any benchmark).")] = 3000,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest reply per prompt.")] = 160,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the corpus.")] = 2,
    seed: Annotated[int, typer.Option("--seed")] = 0,
):
    """Train a draft head for the target on its own replies (CPU, under an hour for the default model).

    The target answers training prompts greedily in its native weights; the head learns to
    predict the target's next hidden state and token, several steps ahead. The head and its
    card (recipe, data, time, held-out acceptance) are written atomically to --out.
    """
    from specmemo.models.resolve import HEADS_DIR
    from specmemo.training.draft_head import HeadRecipe, run

    recipe = HeadRecipe(target=target, prompts=prompts, max_new_tokens=max_new_tokens, epochs=epochs, seed=seed)
    if prompts <= recipe.holdout:
        raise typer.BadParameter(f"--prompts must exceed the {recipe.holdout} held out for evaluation")
    if epochs < 1 or max_new_tokens < 1:
        raise typer.BadParameter(f"--epochs and --max-new-tokens must be ≥ 1, got {epochs} and {max_new_tokens}")
    out = out or HEADS_DIR / f"{target}.safetensors"
    check_writable(out, "--out")
    check_writable(work / "corpus.safetensors", "--work")
    from specmemo.models.resolve import resolve

    resolve(target)   # an unknown target is refused before any work
    run(recipe, out, work, console=err)


def reader_closed() -> int:
    """The reader of our output went away (`specmemo generate … | head -c 5`): stop quietly with
    exit 0, as the Unix tools do. Further writes (the interpreter's own flush at exit) go nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError):   # a stream without a descriptor (a test runner's capture)
            pass
    return 0


def main():
    try:
        # standalone_mode=False returns a command's exit code (typer.Exit) instead of exiting.
        code = app(standalone_mode=False)
    except BrokenPipeError:
        code = reader_closed()
    except typer.Abort:
        err.print("aborted")
        code = 130
    except typer.Exit as e:
        code = e.exit_code
    except Exception as e:
        # Usage errors (typer's bundled click): its own message, and exit 2, never shared with
        # "does not fit" (3).
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        command = e.ctx.command_path if getattr(e, "ctx", None) else "specmemo"
        err.print(f"error: {e.format_message()} (see {command} --help)", soft_wrap=True, markup=False)
        code = e.exit_code
    sys.exit(code if isinstance(code, int) else 0)
