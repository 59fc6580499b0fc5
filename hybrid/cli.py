"""The `hybrid` command: thin click front ends that parse flags into dataclasses and call the library."""

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from hybrid.errors import HybridError

err = Console(stderr=True, soft_wrap=True)  # an error stays one line, however narrow the terminal


class HybridGroup(click.Group):
    """Turns a HybridError anywhere below, and click's own usage errors, into one red line and exit code 2,
    never a traceback or a usage block."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HybridError as e:
            err.print(f"[bold red]error:[/bold red] {escape(str(e))}")
            ctx.exit(2)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "hybrid"
            err.print(f"[bold red]error:[/bold red] {escape(e.format_message())} ({escape(where)} -h for help)")
            sys.exit(2)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except (click.Abort, KeyboardInterrupt, EOFError):
            err.print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


class ModelRef(click.ParamType):
    """MODEL: a checkpoint folder or a Hugging Face id (org/name), resolved through hybrid.read.hub when the
    command runs; a file, a GGUF or a missing folder is one line, not click's "Directory ... is a file"."""

    name = "model"

    def convert(self, value, param, ctx):
        from hybrid.read.hub import resolve_model

        try:
            return resolve_model(str(value))
        except HybridError as e:
            self.fail(str(e), param, ctx)


MODEL = ModelRef()
reference_option = click.option(
    "--reference", is_flag=True,
    help="Run the plain fp32 torch model (the test oracle), not the hybrid runtime; tiny models only.")
threads_option = click.option(
    "--threads", type=click.IntRange(min=1),
    help="CPU threads for the run, torch's and the CPU kernels' together; overrides the plan's cpu_threads "
         "(default: the physical cores).")


@click.group(cls=HybridGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hybrid")
def cli():
    """Run DeepSeek-V3-family MoE models (Kimi-K2) on one workstation."""


@cli.command("make-tiny")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--fp8/--bf16", default=True, help="Block-FP8 linear weights as K2 ships them, or all bf16.")
@click.option("--layers", default=3, show_default=True)
@click.option("--dense-layers", default=1, show_default=True, help="Leading dense layers (first_k_dense_replace).")
@click.option("--experts", default=16, show_default=True)
@click.option("--top-k", default=4, show_default=True)
@click.option("--hidden", default=256, show_default=True)
@click.option("--n-group", default=1, show_default=True)
@click.option("--topk-group", default=1, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--tokenizer-from", type=click.Path(exists=True, file_okay=False),
              help="Folder with K2's tiktoken.model and tokenizer_config.json (vocab becomes K2's 163840).")
@click.option("--shape", type=click.Choice(["tiny", "kimi-k2"]), default="tiny", show_default=True,
              help="kimi-k2: K2's true widths (hidden 7168, 64 heads, experts 2048 wide); --hidden is ignored.")
@click.option("--k2-thinking", is_flag=True,
              help="Kimi-K2-Thinking's layout: routed experts pack-quantized INT4 (group 32), the rest bf16, its "
                   "<think> tokens and a thinking chat template.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def make_tiny_cmd(out, fp8, layers, dense_layers, experts, top_k, hidden, n_group, topk_group, seed,
                  tokenizer_from, shape, k2_thinking, overwrite):
    """Write a random-weight checkpoint in Kimi-K2-Instruct-0905's exact on-disk layout."""
    from hybrid.read.tiny import K2_WIDTHS, TinySpec, make_tiny

    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise click.UsageError(f"{out} exists and is not empty; add --overwrite to replace it")
    widths = K2_WIDTHS if shape == "kimi-k2" else {"hidden": hidden}
    spec = TinySpec(layers=layers, dense_layers=dense_layers, experts=experts, top_k=top_k, n_group=n_group,
                    topk_group=topk_group, seed=seed, fp8=fp8 and not k2_thinking, tokenizer_from=tokenizer_from,
                    int4=k2_thinking, thinking=k2_thinking, **widths)
    path = make_tiny(out, spec, overwrite=overwrite)
    weights = "INT4 experts, bf16" if k2_thinking else "block-FP8" if fp8 else "bf16"
    err.print(f"wrote {path} ({weights}, {layers} layers, {experts} experts, top-{top_k})")


@cli.command()
@click.argument("model", type=MODEL)
@click.option("--prompt", help="Prompt text (needs the checkpoint's tokenizer).")
@click.option("--prompt-ids", help="Prompt as comma-separated token ids, e.g. 1,2,3.")
@click.option("--allow-special", is_flag=True,
              help="Special tokens written in the prompt, e.g. <|im_end|>, become control tokens.")
@click.option("--plan", "plan_file", type=click.Path(exists=True, dir_okay=False), help="Placement plan YAML.")
@click.option("--store", type=click.Path(exists=True, file_okay=False), help="Expert store from `hybrid convert`.")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--temperature", type=float, help="0 is greedy; default from generation_config.json (K2: 0.6).")
@click.option("--top-p", type=float)
@click.option("--top-k", type=int)
@click.option("--min-p", default=0.0, show_default=True)
@click.option("--seed", type=int)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@reference_option
@threads_option
def generate(model, prompt, prompt_ids, allow_special, plan_file, store, as_json, stop, reference, threads,
             **sampling):
    """Generate from MODEL (a checkpoint folder or a Hugging Face id) and print the text as it comes."""
    from hybrid.generation.generate import Stats, generate as run

    check_sampling(**sampling)
    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt and --prompt-ids")
    rt = load_for_cli(model, plan_file, store, reference=reference, threads=threads)
    ids = parse_prompt(prompt, prompt_ids, rt.tokenizer, allow_special)
    params = rt.sampling(**sampling)
    stats = Stats()
    tokenizer = rt.tokenizer
    for step in run(rt.model, ids, params, rt.stop_ids, stats, rt.prefill_chunk, tokenizer=tokenizer,
                    stop_strings=stop, cache=rt.new_cache(len(ids) + params.max_new_tokens)):
        if not as_json:
            click.echo(step.text if tokenizer else f"{step.token} ", nl=False)
    if as_json:
        click.echo(json.dumps({"prompt_ids": ids, "generated_ids": stats.tokens,
                               "text": stats.text if tokenizer else None, "finish_reason": stats.finish_reason,
                               "prompt_tokens": stats.prompt_tokens, "generated_tokens": stats.generated_tokens,
                               "prefill_s": round(stats.prefill_s, 4), "decode_s": round(stats.decode_s, 4)}))
    else:
        click.echo()
        err.print(f"[dim]{stats.generated_tokens} tokens, finish: {stats.finish_reason}, "
                  f"decode {stats.generated_tokens / max(stats.decode_s, 1e-9):.1f} tok/s[/dim]")


@cli.command()
@click.argument("model")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the plan YAML here.")
@click.option("--hardware", type=click.Path(exists=True, dir_okay=False), help="Hardware YAML (see README).")
@click.option("--gpu", help='GPU model, e.g. "RTX 4090"; "none" for a CPU-only machine.')
@click.option("--gpu-memory", type=float, help="GPU memory in GiB (overrides the GPU table).")
@click.option("--ram", help="System RAM, e.g. 768GB.")
@click.option("--memory", help="Memory type and channels, e.g. DDR5-4800x8 (sets RAM bandwidth).")
@click.option("--ram-bandwidth", type=float, help="Achievable RAM read bandwidth in GB/s.")
@click.option("--cores", type=int, help="Physical CPU cores.")
@click.option("--numa-nodes", type=int)
@click.option("--disk-bandwidth", type=float, help="Disk read GB/s, for experts beyond RAM.")
@click.option("--context", type=int, help="Context length to reserve cache for.")
@click.option("--batch", default=1, show_default=True)
@click.option("--experts", "expert_format", help="bf16, int8, int4 (+ -g32/-g64); default int4, and for a GGUF "
              "checkpoint gguf (its experts as stored).")
@click.option("--gpu-expert-layers", type=int, help="Cap on MoE layers whose experts go to the GPU (0: none).")
@click.option("--routing-stats", type=click.Path(exists=True, dir_okay=False), help="Routing counts JSON.")
@click.option("--allow-disk", is_flag=True, help="Let experts beyond RAM stay memory-mapped on disk.")
@click.option("--check", "check_file", type=click.Path(exists=True, dir_okay=False),
              help="Check this plan file against MODEL and the machine, as the runtime will.")
@click.option("--from-ktransformers", type=click.Path(exists=True, dir_okay=False),
              help="Translate their rule file (written with -o even when it does not fit, to edit).")
@click.option("--cluster", help="Past one machine: NODESxGPUSxTYPE (2x8xH200), GPUSxTYPE (8xH100) or a cluster YAML; "
              "says how vLLM and SGLang fit MODEL and prints their launch commands.")
@click.option("--served-model-name", help="With --cluster: the model name the engines serve (default: the name "
              "hybrid serve gives it).")
@click.option("--json", "as_json", is_flag=True)
def plan(model, output, hardware, check_file, from_ktransformers, as_json, cluster, served_model_name, **flags):
    """Plan MODEL (a preset such as kimi-k2-instruct-0905, or a checkpoint folder) for a machine, or with
    --cluster for vLLM and SGLang across GPUs and nodes."""
    from placement.api import plan_command

    if cluster:
        return plan_cluster(model, cluster, served_model_name, as_json, output, hardware, check_file,
                            from_ktransformers, flags)
    if served_model_name:
        raise click.UsageError("--served-model-name goes with --cluster (hybrid serve takes its own)")
    result, notes = plan_command(model, hardware, check_file, from_ktransformers, output, flags)
    if as_json:
        from placement.report import plan_dict

        click.echo(json.dumps(plan_dict(result) | {"notes": notes}, indent=2))
        return
    from placement.report import plan_table

    Console().print(plan_table(result))
    for note in notes:
        err.print(f"[yellow]note:[/yellow] {escape(note)}")
    if output:
        err.print(f"wrote {output}")


# What a single-machine plan reads that a cluster plan has no use for; --ram, --cores and --numa-nodes describe each
# node (kt-kernel's CPU experts), --context sizes the cache.
CLUSTER_REFUSES = {"gpu": "--gpu", "gpu_memory": "--gpu-memory", "memory": "--memory", "ram_bandwidth":
                   "--ram-bandwidth", "disk_bandwidth": "--disk-bandwidth", "expert_format": "--experts",
                   "gpu_expert_layers": "--gpu-expert-layers", "routing_stats": "--routing-stats",
                   "allow_disk": "--allow-disk"}


def plan_cluster(model, cluster, served_model_name, as_json, output, hardware, check_file, from_ktransformers, flags):
    from hybrid.errors import PlanError
    from placement.api import cluster_command
    from placement.report import cluster_commands, cluster_dict, cluster_table

    given = [name for name, value in (("-o", output), ("--hardware", hardware), ("--check", check_file),
                                      ("--from-ktransformers", from_ktransformers)) if value]
    given += [flag for key, flag in CLUSTER_REFUSES.items() if flags.get(key)]
    if flags.get("batch", 1) != 1:
        given.append("--batch")
    if given:
        raise click.UsageError(f"{given[0]} plans one machine; --cluster takes --context, --ram, --cores, "
                               "--numa-nodes, --served-model-name and --json (the node's GPUs are in the cluster)")
    plan = cluster_command(model, cluster, flags.get("context"), served_model_name, flags.get("ram"),
                           flags.get("cores"), flags.get("numa_nodes"))
    if as_json:
        click.echo(json.dumps(cluster_dict(plan), indent=2))
    else:
        Console().print(cluster_table(plan))
        click.echo(cluster_commands(plan))
        for note in plan.notes:
            err.print(f"[yellow]note:[/yellow] {escape(note)}")
    if not plan.fits:
        raise PlanError(plan.refusal())


@cli.command()
@click.argument("checkpoint", type=MODEL)
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--experts", "fmt", help="int4, int8 or bf16 (default: int4; a pack-quantized INT4 checkpoint's own "
                                        "groups, int4-g32 for K2-Thinking: a lossless repack).")
@click.option("--group", type=click.Choice(["32", "64", "128"]), help="Input channels per scale (int4/int8).")
@click.option("--verify", is_flag=True, help="Only recompute and check every checksum of OUT.")
def convert(checkpoint, out, fmt, group, verify):
    """Stream CHECKPOINT's routed experts into an expert store at OUT (resumable; rerun to continue)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    from hybrid.read.convert import convert as run
    from hybrid.read.expert_store import verify_store

    if verify:
        err.print(f"{verify_store(out) / 1e9:.2f} GB verified in {out}")
        return
    fmt = f"{fmt or 'int4'}-g{group}" if group else fmt
    columns = ("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err) as bar:
        task = bar.add_task(f"experts -> {fmt or 'default format'}", total=None)
        run(checkpoint, out, fmt, progress=lambda done, total: bar.update(task, completed=done, total=total))
    err.print(f"wrote {out}")


@cli.command()
@click.argument("model", required=False, type=MODEL)
@click.option("--plan", "plan_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--store", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt-lens", default="128", show_default=True, help="Comma-separated prompt lengths.")
@click.option("--gen", default=16, show_default=True, help="Tokens decoded per run.")
@click.option("--batch", "batches", default="1", show_default=True, help="Comma-separated batch sizes.")
@click.option("--repeat", default=3, show_default=True, help="Measured runs per length and batch (after a warm-up).")
@click.option("--shape", type=click.Choice(["kimi-k2"]), help="Profile a K2-width model instead of MODEL.")
@click.option("--layers", default=2, show_default=True, help="With --shape: layers (the first is dense).")
@click.option("--experts", default=32, show_default=True, help="With --shape: routed experts per layer.")
@click.option("--project-hardware", type=click.Path(exists=True, dir_okay=False),
              help="With --shape: project the full model onto this machine (hardware YAML).")
@click.option("--probe-gib", default=2.0, show_default=True, help="GiB the read-bandwidth probe reads (at least 1/16).")
# Output paths are checked by hybrid.profile.Outputs: one line, before anything runs.
@click.option("--json", "json_out", type=click.Path(), help="The whole report as JSON.")
@click.option("--csv", "csv_out", type=click.Path(), help="One row per prompt length and batch.")
@click.option("--plot", "plot_out", type=click.Path(), help="PNG: time by component, speed by context.")
@click.option("--routing-stats", "routing_out", type=click.Path(), help="Expert counts for hybrid plan.")
@click.option("--hardware-out", type=click.Path(), help="Measured hardware YAML for hybrid plan.")
@threads_option
def profile(model, shape, layers, experts, project_hardware, prompt_lens, batches, gen, repeat, probe_gib,
            plan_file, store, threads, **outputs):
    """Measure prefill and decode, break a token's time down by component, calibrate the planner."""
    from hybrid.generation.threads import default_threads
    from hybrid.profile import Grid, Outputs, progress_display, run_profile, shape_model, summary, table, write_outputs
    from placement.hardware import load_hardware

    if (model is None) == (shape is None):
        raise click.UsageError("give MODEL or --shape kimi-k2")
    if project_hardware and not shape:
        raise HybridError("--project-hardware projects the full model, so it needs --shape kimi-k2")
    # Every flag and output path is checked here, before minutes of loading and measuring.
    grid = Grid.parse(prompt_lens, batches, gen=gen, repeat=repeat, probe_gib=probe_gib)
    outputs = Outputs(**outputs)
    outputs.check()
    target = load_hardware(project_hardware) if project_hardware else None
    with progress_display(err) as progress:
        report = run_profile(model or shape_model(shape, layers, experts, progress), grid, plan_file, store,
                             full_model="kimi-k2-instruct-0905" if shape else None, project_to=target,
                             progress=progress, threads=threads or default_threads())
    Console().print(table(report))
    for line in summary(report):
        err.print(line)
    write_outputs(report, outputs)


@cli.command()
@click.argument("model", required=False, type=MODEL)
@click.option("--demo", is_flag=True, help="Chat with a tiny random-weight K2-layout model (written on first use).")
@click.option("--plan", "plan_file", type=click.Path(exists=True, dir_okay=False), help="Placement plan YAML.")
@click.option("--store", type=click.Path(exists=True, file_okay=False), help="Expert store from `hybrid convert`.")
@click.option("--system", help="System prompt (default: the chat template's own, K2: \"You are Kimi, ...\").")
@click.option("--temperature", type=float, help="0 is greedy; default from generation_config.json (K2: 0.6).")
@click.option("--max-new-tokens", type=int, help="Per reply (default: until the context is full; demo: 200).")
@click.option("--seed", type=int)
@click.option("--tools", "tools_file", type=click.Path(exists=True, dir_okay=False),
              help="JSON list of OpenAI-style function declarations the model may call.")
@click.option("--prompt", help="Send this one message, print the reply, and exit (scripts, tests).")
@reference_option
@threads_option
def chat(model, demo, plan_file, store, tools_file, prompt, max_new_tokens, reference, threads, **settings):
    """Chat with MODEL (a checkpoint folder or a Hugging Face id) in the terminal; /help lists the commands."""
    from hybrid.chat import run_chat
    from hybrid.generation.conversation import ChatSession

    if demo == (model is not None):
        raise click.UsageError("give a MODEL folder or --demo")
    if demo:
        from hybrid.generation.demo import ensure_demo_model

        model, max_new_tokens = ensure_demo_model(), max_new_tokens or 200
        err.print(f"[dim]demo model: {escape(str(model))} (random weights: its replies are noise)[/dim]")
    check_sampling(temperature=settings["temperature"], seed=settings["seed"], max_new_tokens=max_new_tokens)
    if tools_file:
        from hybrid.generation.tools import load_tools

        load_tools(tools_file)  # its one-line error before minutes of loading
    session = ChatSession.open(load_for_cli(model, plan_file, store, needs_chat=True, reference=reference,
                                            threads=threads),
                               tools_file=tools_file, max_new_tokens=max_new_tokens, **settings)
    from hybrid.read.hub import display_name

    sys.exit(run_chat(session, err, prompt,
                      banner=f"{display_name(model)}: {session.cache.max_len} tokens of context"))


@cli.command()
@click.argument("model", type=MODEL)
@click.option("--plan", "plan_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--store", type=click.Path(exists=True, file_okay=False))
@reference_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback unless you say so).")
@click.option("--port", default=8000, show_default=True)
@click.option("--api-key", envvar="HYBRID_API_KEY",
              help="Require Authorization: Bearer KEY on every route but /health and the chat page.")
@click.option("--served-model-name", "names", multiple=True,
              help="Model name the API lists and accepts; repeat for aliases, the first is the main one "
                   "(default: the folder's name, which is always accepted).")
@click.option("--max-concurrency", default=4, show_default=True, help="Requests decoded together.")
@click.option("--max-context", type=int, help="Positions per request (default: the plan's or the model's).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              default="info", show_default=True, help="info logs one line per request.")
@threads_option
def serve(model, plan_file, store, reference, host, port, api_key, names, max_concurrency, max_context, log_level,
          threads):
    """Serve MODEL over the OpenAI and Anthropic HTTP APIs (chat, completions, messages, tools, streaming),
    with a chat page at /."""
    from hybrid.errors import ConfigError
    from hybrid.server.app import bind, serve as run_server
    from hybrid.server.observe import setup_logging
    from hybrid.read.hub import display_name
    from hybrid.server.service import Service

    for flag, value in (("--max-concurrency", max_concurrency), ("--max-context", max_context)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: must be at least 1")
    sock = bind(host, port)  # before the model loads (minutes for K2): a port in use is one line at once
    setup_logging(log_level)
    runtime = load_for_cli(model, plan_file, store, needs_chat=True, reference=reference, threads=threads)
    service = Service(runtime, tuple(names) or (display_name(model),), max_concurrency, max_context,
                      also_accepted=(model.name,))
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    err.print(f"serving {service.name} on {url} (chat page at /, API at /v1; {max_concurrency} concurrent, "
              f"context {service.max_context}{', API key required' if api_key else ''})")
    failure = run_server(service, sock, api_key, log_level)
    if failure is not None:
        err.print(f"[bold red]error:[/bold red] the engine failed, server stopped: "
                  f"{escape(f'{type(failure).__name__}: {failure}')}")
        sys.exit(1)


@cli.command()
@click.option("--threads", type=click.IntRange(min=1), help="Kernel threads, and torch's for its baselines "
              "(default: the physical cores).")
@click.option("--formats", default="bf16,int8,int4", show_default=True,
              help="Comma list, e.g. int4,int4-g32,int8-g64, or GGUF types Q4_K,Q2_K,IQ2_XXS.")
@click.option("--gguf", is_flag=True, help="Add every GGUF block type (Q8_0, K-quants, IQ and TQ types).")
@click.option("--experts", type=click.IntRange(min=8), default=64, show_default=True,
              help="Experts in the layer (working set = experts x size).")
@click.option("--quick", is_flag=True, help="16 experts, prefill 32/128 only, no torch bf16.")
@click.option("--no-torch", is_flag=True, help="Skip the torch baselines.")
@click.option("--kt-python", help="Interpreter with kt-kernel installed: adds its AMXINT8/AMXINT4 rows.")
@click.option("--llama-python", type=click.Path(exists=True, dir_okay=False),
              help="Interpreter with llama-cpp-python built from source: adds llama.cpp's row "
              "for each GGUF type.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the results here.")
@click.option("--markdown", type=click.Path(dir_okay=False), help="Write the tables as Markdown here.")
def bench(threads, formats, gguf, experts, quick, no_torch, kt_python, llama_python, json_path, markdown):
    """The CPU expert-kernel benchmark: decode GB/s against a bandwidth probe, prefill, torch baselines, and
    llama.cpp's rows for the GGUF types."""
    from types import SimpleNamespace

    from cpu_kernels.bench import format_list
    from cpu_kernels.bench import run as run_bench
    from cpu_kernels.threads import physical_cores

    try:
        format_list(formats, gguf)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--formats") from None
    run_bench(SimpleNamespace(threads=threads or physical_cores(), formats=formats, gguf=gguf, experts=experts,
                              quick=quick, no_torch=no_torch, kt_python=kt_python, llama_python=llama_python,
                              json=json_path, markdown=markdown))


def check_sampling(**given):
    """Sampling flags checked before the model loads (minutes for K2): SamplingParams raises one ConfigError
    naming the flag."""
    from hybrid.generation.sampling import SamplingParams

    SamplingParams(**{k: v for k, v in given.items() if v is not None})


def parse_prompt(prompt, prompt_ids, tokenizer, allow_special: bool = False) -> list[int]:
    """Token ids from --prompt-ids, or --prompt's text (generate has checked that exactly one is given), in
    which special-token strings stay text unless allow_special (a pasted web page cannot end a turn by
    accident)."""
    if prompt_ids is not None:
        try:
            return [int(t) for t in prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise click.BadParameter(f"{prompt_ids!r} is not a comma-separated list of integers",
                                     param_hint="--prompt-ids") from None
    if tokenizer is None:
        raise click.UsageError("this checkpoint has no tokenizer (tiktoken.model); use --prompt-ids")
    return tokenizer.encode(prompt, allow_special=allow_special)


def load_for_cli(folder: Path, plan_file=None, store=None, needs_chat: bool = False, reference: bool = False,
                 threads: int | None = None):
    """open_runtime with a progress bar, on a budget of `threads` CPU threads (default: the physical cores).
    Without a plan file the model is planned for this machine now (the plan's summary shown, with how to save
    it), unless `reference` asks for the plain fp32 torch model. Every file and the plan are checked before any
    weight is read."""
    from rich.progress import Progress

    from hybrid.generation.runtime import open_runtime, plan_for_this_machine, plan_summary
    from hybrid.generation.threads import default_threads
    from hybrid.read.open import open_checkpoint
    from placement.plan import with_threads

    if reference and (plan_file or store):
        raise click.UsageError("--reference runs the plain torch model: it takes no --plan or --store")
    ckpt, plan, threads = open_checkpoint(folder), plan_file, threads or default_threads()
    if plan is None and not reference:
        plan = with_threads(plan_for_this_machine(ckpt, store).plan, threads)
        err.print(f"[dim]no --plan: planned for this machine: {escape(plan_summary(plan))} "
                  f"(`hybrid plan {escape(str(folder))} -o plan.yaml` writes it to edit)[/dim]")
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("loading weights", total=None)
        rt = open_runtime(ckpt, plan, store, needs_chat=needs_chat, threads=threads,
                          progress=lambda done, total: bar.update(task, completed=done, total=total))
    for note in rt.plan.notes if rt.plan is not None else ():
        err.print(f"[yellow]note:[/yellow] {escape(note)}")
    return rt


def main():
    from hybrid.generation.threads import quiet_openmp

    quiet_openmp()  # before any command imports torch
    cli(prog_name="hybrid")


if __name__ == "__main__":
    sys.exit(main())
