"""`hybrid chat`: the terminal front end of a ChatSession (hybrid.generation.conversation).

Reads lines with prompt_toolkit when stdin is a terminal (line editing, history in the cache folder, Alt-Enter
or Esc Enter for a new line, pasted blocks kept whole), plain lines otherwise. Streams the reply to stdout;
tool calls, warnings and notices go to stderr. A thinking model's reasoning goes to stderr too, dimmed, before
the answer (`/think` folds it into one "thought for N tokens" line and back). Ctrl-C during a reply stops it at
the next token and keeps the session (a second Ctrl-C stops at once); Ctrl-C at the prompt clears the line;
Ctrl-D leaves.
"""

import signal
import sys
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass

from rich.markup import escape
from rich.text import Text as Styled

from hybrid.errors import HybridError
from hybrid.generation.tools import Reasoning, Text, ToolCall, Warn

HELP = """commands:
  /reset          start a new conversation (the system prompt stays)
  /system TEXT    set the system prompt (/system alone: show it; /system - : the template's default)
  /stats          speed of the last reply and cache use
  /think          show a thinking model's reasoning, or fold it into one line (a toggle)
  /save FILE      write the conversation as JSON messages
  /exit           leave (Ctrl-D does too)
Enter sends; Alt-Enter (or Esc then Enter) starts a new line; Ctrl-C stops a reply."""


@dataclass
class View:
    """How replies are shown (front-end settings the commands change)."""
    show_reasoning: bool = True


def run_chat(session, console, prompt: str | None = None, banner: str = "", view: View | None = None) -> int:
    """One turn for `prompt` (scripts), else the interactive loop. Returns the exit code."""
    view = view or View()
    if prompt is not None:
        session.add_user(prompt)
        return 0 if reply(session, console, view) is not None else 1
    read = terminal_reader() if sys.stdin.isatty() else plain_reader
    if banner:
        say(console, f"[dim]{escape(banner)}[/dim]")
    say(console, "[dim]/help for commands, Ctrl-D to leave[/dim]")
    while True:
        try:
            text = read("> ")
        except KeyboardInterrupt:
            continue
        except EOFError:
            return 0
        if text.strip().startswith("/"):
            if command(session, text.strip(), console, view) == "exit":
                return 0
        elif text.strip():
            session.add_user(text)
            converse(session, console, read, view)


def converse(session, console, read, view: View | None = None):
    """The model's reply, then as long as it calls tools: the results typed in, and its next reply."""
    while True:
        calls = reply(session, console, view)
        if calls is None:  # the reply could not start (context full): leave no question unanswered
            session.forget_unanswered()
            return
        if not calls:
            return
        for call in calls:
            try:
                result = read(f"result of {call.id}> ")
            except (KeyboardInterrupt, EOFError):
                say(console, "[dim]tool results skipped; the conversation goes on[/dim]")
                return
            session.add_tool_result(call, result)


def reply(session, console, view: View | None = None) -> list | None:
    """Stream one reply; returns its tool calls (empty when it made none or was stopped), None on an error."""
    out = sys.stdout
    calls = []
    thought = Thought(session, console, view or View())
    try:
        with ctrl_c_flag() as stopped:
            for event in session.respond(cancel=stopped):
                if isinstance(event, Reasoning):
                    thought.show(event.text)
                    continue
                thought.end()
                if isinstance(event, Text):
                    out.write(printable(event.text))
                    out.flush()
                elif isinstance(event, ToolCall):
                    calls.append(event)
                    out.write("\n")
                    say(console, f"[cyan]tool call {escape(event.id)}[/cyan] {escape(event.name)}"
                                  f"({escape(event.arguments)})")
                elif isinstance(event, Warn):
                    say(console, f"[yellow]warning:[/yellow] {escape(event.message)}")
    except KeyboardInterrupt:
        thought.end()
        out.write("\n")
        say(console, "[dim]\\[stopped][/dim]")
        return []
    except HybridError as e:
        thought.end()
        out.write("\n")
        say(console, f"[bold red]error:[/bold red] {escape(str(e))}")
        return None
    thought.end()
    out.write("\n")
    out.flush()
    reason = session.last.finish_reason
    if reason == "interrupted":
        say(console, "[dim]\\[interrupted][/dim]")
        return []
    if reason == "length":
        say(console, "[dim]\\[reply cut: token limit or context full][/dim]")
    return calls


class Thought:
    """A reply's reasoning on the console: streamed dimmed, or, folded, one line once it is over."""

    def __init__(self, session, console, view: View):
        self.session, self.console, self.view = session, console, view
        self.started = self.ended = False

    def show(self, text: str):
        self.started = True
        if self.view.show_reasoning:
            self.console.print(Styled(printable(text), style="dim"), end="", highlight=False, soft_wrap=True)

    def end(self):
        """The reasoning is over (the answer began, or the reply ended): close its line once."""
        if not self.started or self.ended:
            return
        self.ended = True
        if self.view.show_reasoning:
            self.console.print()
        else:
            say(self.console, f"[dim]thought for {self.session.reasoning_tokens} tokens (/think shows it)[/dim]")


def command(session, line: str, console, view: View | None = None) -> str | None:
    view = view if view is not None else View()
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return "exit"
    if name == "/help":
        say(console, escape(HELP))
    elif name == "/reset":
        session.reset()
        say(console, "[dim]new conversation[/dim]")
    elif name == "/system":
        if arg:
            session.set_system(None if arg == "-" else arg)
        shown = session.system if session.system else "(the chat template's default)"
        say(console, f"[dim]system prompt:[/dim] {escape(shown)}")
    elif name == "/stats":
        say(console, escape(stats_text(session.stats())))
    elif name == "/think":
        view.show_reasoning = not view.show_reasoning
        say(console, f"[dim]reasoning {'shown' if view.show_reasoning else 'folded into one line'}[/dim]")
    elif name == "/save" and arg:
        try:
            n = session.save(arg)
        except OSError as e:
            say(console, f"[bold red]error:[/bold red] {escape(str(e))}")
        else:
            say(console, f"[dim]saved {n} messages to {escape(arg)}[/dim]")
    else:
        say(console, f"unknown command {escape(line)!r}; /help lists them")
    return None


def say(console, markup: str):
    """One line of rich markup, without rich's highlighting (it would colour numbers in model text)."""
    console.print(markup, highlight=False)


def stats_text(s: dict) -> str:
    reasoning = f" ({s['reasoning_tokens']} of them reasoning)" if s.get("reasoning_tokens") else ""
    return (f"last reply: {s['new_tokens']} prompt tokens prefilled at {s['prefill_tok_s']:.1f} tok/s "
            f"({s['reused_tokens']} reused from the cache), {s['generated_tokens']} tokens decoded{reasoning} at "
            f"{s['decode_tok_s']:.1f} tok/s, finish: {s['finish_reason']}\n"
            f"cache: {s['cache_tokens']} of {s['cache_capacity']} positions "
            f"({100 * s['cache_tokens'] / s['cache_capacity']:.1f} %, {s['cache_mib']:.1f} MiB); "
            f"{s['messages']} messages")


@contextmanager
def ctrl_c_flag():
    """During a reply: the first Ctrl-C sets a flag the session checks between tokens; a second one raises
    KeyboardInterrupt at once."""
    hit = []

    def on_sigint(signum, frame):
        if hit:
            raise KeyboardInterrupt
        hit.append(True)

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, old)


def printable(text: str) -> str:
    """Model text made safe for a terminal: control characters (an escape sequence could take the terminal
    over) other than newline and tab are shown as \\xNN."""
    return "".join(f"\\x{ord(c):02x}" if unicodedata.category(c) == "Cc" and c not in "\n\t" else c for c in text)


def plain_reader(prompt: str) -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def terminal_reader():
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    from hybrid.generation.demo import cache_dir

    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(cache_dir() / "chat_history"))
    except OSError:
        history = InMemoryHistory()
    prompt_session = PromptSession(history=history, key_bindings=keys)

    def continuation(width, line_number, is_soft_wrap):
        return "." * (width - 1) + " "

    return lambda prompt: prompt_session.prompt(prompt, prompt_continuation=continuation)
