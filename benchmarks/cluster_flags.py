"""The commands `hybrid plan --cluster` writes, run through vLLM's and SGLang's own argument parsers.

Both engines install without a GPU far enough to build their command-line parsers, so instead of trusting the flags
quoted in tests/test_cluster.py, this parses every vllm/sglang command the planner writes for the deployments of
issue 19 with the engine's parser of the version placement/launch.py names, then runs the checks the engine makes
before it loads anything (vLLM: validate_parsed_serve_args and its registered tool-call and reasoning parsers;
SGLang: the parsers are argparse choices). What the engine then reads must be the layout the planner sized: vLLM's
engine arguments (tensor and data parallel sizes, expert parallelism, context, and --gpu-memory-utilization, whose
default the planner's memory sum assumes), SGLang's tp size, context, nodes and kt-kernel expert split, with no
--mem-fraction-static (the planner assumes SGLang's own reserve). Negative controls (a misspelled flag, a parser
name the engine does not register) must be refused, or the check proves nothing. Ray's commands are not parsed.

In a scratch venv beside this repository, never in the project's (the engines pin their own torch; --no-deps
keeps this machine's CPU torch, and the modules they import at parse time come one by one):

    python -m venv /tmp/engines && . /tmp/engines/bin/activate
    pip install torch==2.13.0 && pip install -e .
    pip install --no-deps vllm==0.33.0 sglang==0.5.23
    pip install psutil cbor2 pyzmq transformers aiohttp openai openai_harmony msgspec cloudpickle pillow \\
        pybase64 cachetools uvloop py-cpuinfo partial_json_parser xgrammar llguidance orjson ipython
    python benchmarks/cluster_flags.py

Exits 1 when a command is refused or a negative control is accepted.
"""

import argparse
import contextlib
import io
import os
import sys
from importlib.metadata import version

from rich.console import Console
from rich.table import Table

from placement.api import cluster_command
from placement.cluster import SGLANG, SGLANG_KT, VLLM, VLLM_UTILIZATION, Layout
from placement.launch import ENGINE_VERSIONS, HEAD_IP, MODEL_DIR

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

# The deployments issue 19 names, and one node with CPU experts (kt-kernel) beside four GPUs.
SCENARIOS = [
    ("kimi-k2-instruct-0905", "2x8xH200", {}),
    ("kimi-k2-instruct-0905", "2x8xH20", {}),
    ("kimi-k2-thinking", "8xH200", {}),
    ("kimi-k2-instruct-0905", "1x4xH100", {"ram": "1TB", "cores": 96, "numa_nodes": 2}),
]
# What a shell would put in for the placeholders: the parsers see what the engine will.
FILLED = {HEAD_IP: "10.0.0.1", MODEL_DIR: "/models/Kimi-K2-Instruct-0905"}


def _fill(argv) -> list[str]:
    out = []
    for a in argv:
        for k, v in FILLED.items():
            a = a.replace(k, v)
        out.append(a)
    return out


def _refusal(run) -> str | None:
    """None when run() goes through; else the engine's own words, on one line (argparse's list of choices cut)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            run()
    except SystemExit:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        return (lines[-1] if lines else "argparse exit").split(" (choose from")[0]
    except Exception as e:  # the engines' pre-load checks raise TypeError, KeyError, ValueError
        return f"{type(e).__name__}: {e}".splitlines()[0].split(" (chose from")[0]
    return None


def _differs(what: str, engine_reads, planned) -> None:
    if engine_reads != planned:
        raise ValueError(f"the engine reads {what} {engine_reads!r}, the planner sized {planned!r}")


class VLLMParser:
    def __init__(self):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.common.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.reasoning import ReasoningParserManager
        from vllm.tool_parsers.abstract_tool_parser import ToolParserManager
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        self.parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
        self.validate = validate_parsed_serve_args
        self.engine_args = AsyncEngineArgs.from_cli_args
        self.tools = set(ToolParserManager.list_registered())
        self.reasoning = set(ReasoningParserManager.list_registered())

    def check(self, argv: list[str], layout: Layout | None = None, context: int | None = None) -> str | None:
        assert argv[:2] == ["vllm", "serve"], argv

        def run():
            args = self.parser.parse_args(argv[2:])
            self.validate(args)
            if args.enable_auto_tool_choice and args.tool_call_parser not in self.tools:
                raise KeyError(f"tool-call parser {args.tool_call_parser!r} is not registered")
            reasoning = args.reasoning_parser
            if reasoning and reasoning not in self.reasoning:
                raise KeyError(f"reasoning parser {reasoning!r} is not registered")
            if layout is None:
                return
            args.model = args.model_tag
            e = self.engine_args(args)
            _differs("tensor parallel size", e.tensor_parallel_size, layout.tp)
            _differs("data parallel size", e.data_parallel_size, layout.dp)
            _differs("expert parallelism", e.enable_expert_parallel, layout.expert_parallel)
            _differs("max model length", e.max_model_len, context)
            _differs("GPU memory utilization", e.gpu_memory_utilization, layout.utilization or VLLM_UTILIZATION)
        return _refusal(run)


class SGLangParser:
    def __init__(self):
        from sglang.srt.server_args import ServerArgs
        self.parser = argparse.ArgumentParser(prog="python -m sglang.launch_server")
        ServerArgs.add_cli_args(self.parser)

    def check(self, argv: list[str], layout: Layout | None = None, context: int | None = None,
              nodes: int = 1) -> str | None:
        assert argv[:3] == ["python", "-m", "sglang.launch_server"], argv

        def run():
            args = self.parser.parse_args(argv[3:])
            if layout is None:
                return
            _differs("tp size", args.tp_size, layout.tp)
            _differs("context length", args.context_length, context)
            _differs("nodes", args.nnodes, nodes)
            _differs("--mem-fraction-static", args.mem_fraction_static, None)
            if layout.kt_method:
                _differs("kt-kernel GPU experts", args.kt_num_gpu_experts, layout.gpu_experts)
                _differs("kt-kernel method", args.kt_method, layout.kt_method)
        return _refusal(run)


def main() -> int:
    console = Console()
    engines = {VLLM: VLLMParser(), SGLANG: SGLangParser()}
    engines[SGLANG_KT] = engines[SGLANG]
    # SGLang + kt-kernel is the sglang package.
    installed = {VLLM: version("vllm"), SGLANG: version("sglang")}
    installed[SGLANG_KT] = installed[SGLANG]
    for name, want in ENGINE_VERSIONS.items():
        have = installed[name]
        if have != want:
            console.print(f"[yellow]{name}: {have} installed, the commands are written for {want}[/]")

    table = Table(title="hybrid plan --cluster commands through the engines' parsers")
    for col in ("model", "cluster", "layout", "engine", "node", "result"):
        table.add_column(col)
    failures = 0
    checked = 0
    for model, cluster, extra in SCENARIOS:
        plan = cluster_command(model, cluster, **extra)
        for cmd in plan.commands:
            if cmd.engine not in engines:  # ray's start commands
                continue
            layout = next(x for x in plan.layouts if x.engine == cmd.engine and x.name == cmd.layout)
            nodes = {} if cmd.engine == VLLM else {"nodes": plan.cluster.nodes}
            why = engines[cmd.engine].check(_fill(cmd.argv), layout, plan.context, **nodes)
            checked += 1
            failures += why is not None
            table.add_row(model, cluster, cmd.layout, f"{cmd.engine} {installed[cmd.engine]}",
                          "-" if cmd.node is None else str(cmd.node),
                          "[green]parsed[/]" if why is None else f"[red]{why}[/]")
    console.print(table)

    # The check must be able to fail: each of these has to be refused by the engine.
    vllm_ok = ["vllm", "serve", "moonshotai/Kimi-K2-Instruct-0905", "--tensor-parallel-size", "8"]
    sglang_ok = ["python", "-m", "sglang.launch_server", "--model-path", "moonshotai/Kimi-K2-Instruct-0905"]
    controls = [
        (VLLM, vllm_ok + ["--tensor-paralel-size", "8"]),
        (VLLM, vllm_ok + ["--enable-auto-tool-choice", "--tool-call-parser", "not_a_parser"]),
        (VLLM, vllm_ok + ["--reasoning-parser", "not_a_parser"]),
        (VLLM, vllm_ok + ["--enable-auto-tool-choice"]),
        (SGLANG, sglang_ok + ["--tp-sise", "8"]),
        (SGLANG, sglang_ok + ["--tool-call-parser", "not_a_parser"]),
        (SGLANG, sglang_ok + ["--reasoning-parser", "not_a_parser"]),
    ]
    ctrl = Table(title="negative controls (each must be refused)")
    ctrl.add_column("engine")
    ctrl.add_column("extra arguments")
    ctrl.add_column("engine says")
    for name, argv in controls:
        base = vllm_ok if name == VLLM else sglang_ok
        base_refused = engines[name].check(base)
        if base_refused is not None:
            console.print(f"[red]{name}: the control's base command is refused: {base_refused}[/]")
            failures += 1
        why = engines[name].check(argv)
        failures += why is None
        ctrl.add_row(name, " ".join(argv[len(base):]), "[red]accepted[/]" if why is None else why)
    # ... and so must a command whose parallel size is not the layout's.
    why = engines[VLLM].check(vllm_ok, Layout(VLLM, "TP16", 16), 131072)
    failures += why is None
    ctrl.add_row(VLLM, "(TP8 command checked against a TP16 layout)", "[red]accepted[/]" if why is None else why)
    console.print(ctrl)
    registered = engines[VLLM]
    console.print(f"vLLM registers tool-call parser kimi_k2: {'kimi_k2' in registered.tools}, "
                  f"reasoning parser kimi_k2: {'kimi_k2' in registered.reasoning}")
    console.print(f"{checked} commands parsed, {failures} failures ({sys.platform}, python {sys.version.split()[0]})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
