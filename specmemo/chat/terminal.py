"""The interactive terminal: streams replies with rich, handles /commands, Ctrl-C and Ctrl-D.

With a terminal on stdin it is a REPL. Otherwise each input line is one user turn, each reply is
printed in turn, and it exits 0 at end of input.
"""

import json
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

from specmemo.atomic import atomic_write_text
from specmemo.budget.units import count, format_bytes
from specmemo.chat.session import ChatSession, Evicted, Reprefilled, TextDelta, TurnRecord
from specmemo.errors import BadInput
from specmemo.models.text import clean_text

COMMANDS = ("/help", "/stats", "/save", "/reset", "/exit")
HELP = "/help  /stats  /save FILE  /reset  /exit   (//text sends /text; Ctrl-C stops a reply, Ctrl-D quits)"


class Interrupt:
    """Ctrl-C during a reply sets a flag; the engine stops at the next step, caches consistent."""

    def __init__(self):
        self.requested = False

    @contextmanager
    def armed(self):
        self.requested = False
        previous = signal.signal(signal.SIGINT, lambda *_: setattr(self, "requested", True))
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class ChatTerminal:
    def __init__(self, session: ChatSession, console: Console, show_stats: bool, log=None, errors: Console | None = None):
        """log: an open, line-buffered file for --json-log (opened before the model loads, so a
        bad path fails fast), or None."""
        self.session, self.console = session, console
        self.errors = errors or Console(stderr=True, highlight=False)
        self.show_stats = show_stats
        self.log = log
        self.interrupt = Interrupt()

    # -- rendering -----------------------------------------------------------------------------

    def stats_table(self) -> Table:
        s = self.session
        table = Table(title="session", show_header=True)
        for col in ("turn", "context", "prefilled", "new", "accepted/drafted", "tok/s", "prefill tok/s", "peak",
                    "evicted"):
            table.add_column(col, justify="right")
        for t in s.turns:
            g = t.stats
            table.add_row(str(t.turn), f"{t.context_tokens}/{t.context_limit}", str(g.prefilled_tokens),
                          str(g.new_tokens), f"{g.accepted_tokens}/{g.drafted_tokens}", f"{g.tokens_per_s:.1f}",
                          f"{g.prefill_tokens_per_s:.0f}", format_bytes(t.peak_bytes),
                          f"{t.evicted_tokens} ({t.evicted_turns} turns)")
        table.caption = (f"budget {format_bytes(s.rt.report.budget_bytes)} · plan {format_bytes(s.rt.report.plan.total_bytes)}"
                         f" · drafter {s.rt.report.drafter} · k ≤ {s.rt.report.plan.request.draft_len}")
        return table

    def turn_line(self, t: TurnRecord) -> str:
        s = t.stats
        return (f"[dim]{count(s.new_tokens, 'token')} · {s.tokens_per_s:.1f} tok/s · prefill {count(s.prefilled_tokens, 'token')} at "
                f"{s.prefill_tokens_per_s:.0f} tok/s · accepted {s.accepted_tokens}/{s.drafted_tokens} · context "
                f"{t.context_tokens}/{t.context_limit} · peak {format_bytes(t.peak_bytes)} of "
                f"{format_bytes(t.budget_bytes)}[/]")

    def write_log(self, row: dict) -> None:
        if self.log:
            self.log.write(json.dumps(row) + "\n")

    # -- one turn --------------------------------------------------------------------------------

    def answer(self, text: str) -> None:
        """One turn; the caller has armed the Ctrl-C flag (see `lines` and `repl`)."""
        record = None
        try:
            for ev in self.session.ask(text, should_stop=lambda: self.interrupt.requested):
                if isinstance(ev, TextDelta):
                    self.console.print(ev.text, end="", style="cyan", markup=False, highlight=False, soft_wrap=True)
                elif isinstance(ev, Evicted):
                    self.console.print(f"[yellow]dropped the oldest {ev.turns} exchange(s), {ev.tokens} tokens, "
                                       "to stay within the memory budget[/]")
                elif isinstance(ev, Reprefilled):
                    self.console.print(f"[yellow]prefilling the conversation again ({ev.tokens} tokens; "
                                       f"reason: {ev.reason})[/]")
                elif isinstance(ev, TurnRecord):
                    record = ev
        except BadInput as e:
            self.errors.print(f"error: {e}", markup=False, soft_wrap=True)
            self.write_log({"turn": len(self.session.turns) + 1, "error": str(e)})
            return
        self.console.print()
        if record.stats.stop_reason == "interrupted":
            self.console.print("[yellow](reply stopped)[/]")
        if record.over_budget:
            self.errors.print(f"[red]this turn peaked at {format_bytes(record.peak_bytes)}, over the budget of "
                              f"{format_bytes(record.budget_bytes)}; the context is now "
                              f"{self.session.context_cap} tokens[/]")
        if self.show_stats or record.evicted_tokens:
            self.console.print(self.turn_line(record))
        self.write_log(record.to_json())

    # -- commands ---------------------------------------------------------------------------------

    def save(self, arg: str) -> None:
        if not arg.strip():
            self.console.print("[red]usage: /save FILE[/]")
            return
        try:
            path = atomic_write_text(Path(arg.strip()).expanduser(),
                                     json.dumps(self.session.transcript(), indent=2) + "\n")
        except OSError as e:
            self.errors.print(f"error: could not save: {e.strerror or e}: {arg.strip()}", markup=False)
            return
        self.console.print(f"[green]saved {len(self.session.conversation.messages)} messages to {path}[/]")

    def command(self, line: str) -> bool:
        """Run a /command; False means exit."""
        name, _, arg = line.partition(" ")
        if name == "/exit":
            return False
        if name == "/help":
            self.console.print(HELP)
        elif name == "/reset":
            self.session.reset()
            self.console.print("[green]conversation cleared[/]")
        elif name == "/stats":
            self.console.print(self.stats_table())
        elif name == "/save":
            self.save(arg)
        else:
            self.console.print(f"[red]unknown command {name}[/]; {HELP}")
        return True

    def handle(self, line: str, interactive: bool = True) -> bool:
        """One input line. Known /commands run; '//x' sends '/x'. Piped input sends any other
        line as a message (it may well start with a path), a terminal explains the command set."""
        line = clean_text(line).strip()
        if not line:
            return True
        if line.startswith("//"):
            line = line[1:]
        elif line.split(" ", 1)[0] in COMMANDS or (interactive and line.startswith("/")):
            return self.command(line)
        self.answer(line)
        return True

    # -- loops ------------------------------------------------------------------------------------

    def repl(self) -> None:
        self.console.print(f"[bold]specmemo chat[/] · {self.session.rt.target.ref.name} + {self.session.rt.report.drafter}"
                           f" · {self.session.rt.target.forward_path} forward"
                           + (f" ({self.session.rt.target.attention} attention)" if self.session.rt.target.attention else "")
                           + (" (compiled products)" if self.session.rt.target.products == "compiled" else "")
                           + f" · context {self.session.context_cap} tokens · budget "
                           f"{format_bytes(self.session.rt.report.budget_bytes)}\n[dim]{HELP}[/]")
        while True:
            try:
                line = input("you> ")
            except EOFError:
                self.console.print()
                return
            except KeyboardInterrupt:
                self.console.print("\n[dim](Ctrl-D or /exit to quit)[/]")
                continue
            with self.interrupt.armed():  # from the moment a line is in: Ctrl-C never kills a turn
                if not self.handle(line):
                    return

    def lines(self, stream) -> None:
        for line in stream:
            with self.interrupt.armed():
                if not self.handle(line, interactive=False):
                    return

    def run(self) -> None:
        # Bytes that are not UTF-8 become U+FFFD instead of ending the chat with a traceback.
        if hasattr(sys.stdin, "reconfigure"):
            sys.stdin.reconfigure(errors="replace")
        try:
            if sys.stdin.isatty():
                import readline  # noqa: F401  (line editing and history for input())
                self.repl()
            else:
                self.lines(sys.stdin)
        finally:
            if self.log:
                self.log.close()
