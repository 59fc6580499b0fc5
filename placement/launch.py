"""The command lines that start vLLM or SGLang on a cluster layout (placement.cluster), node by node.

Every flag written here is one the engine documents in the version ENGINE_VERSIONS names: tests/test_cluster.py
holds the commands to the flags quoted from those versions, and benchmarks/cluster_flags.py runs them through the
engines' own argument parsers, which install without a GPU. Kimi-K2 gets its tool-call parser (and K2-Thinking
its reasoning parser, so the reasoning comes back apart from the answer as `hybrid serve` returns it); the model is
served under the name `hybrid serve` gives it, on the port it uses, with the same OpenAI and Anthropic routes
(ROUTES), so a client changes only its base URL.

Multi-node commands name node 0's address ${HEAD_IP} (the cluster YAML's head_ip fills it in) and a local
checkpoint folder ${MODEL_DIR} where the engine needs one; set both in the shell before pasting.
"""

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from hybrid.read.config import ModelConfig
from placement.cluster import SGLANG, SGLANG_KT, VLLM, Cluster, Layout

ENGINE_VERSIONS = {VLLM: "0.33.0", SGLANG: "0.5.23", SGLANG_KT: "0.5.23"}

# Routes `hybrid serve` answers that vLLM 0.33.0 (vllm/entrypoints/{openai,anthropic}/*/api_router.py) and SGLang
# 0.5.23 (sglang/srt/entrypoints/http_server.py) answer too.
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/messages", "/health")
PORT = 8000  # hybrid serve's default, so a client's base URL changes only in its host
RAY_PORT, DP_RPC_PORT, SGLANG_DIST_PORT = 6379, 13345, 50000
HEAD_IP, MODEL_DIR = "${HEAD_IP}", "${MODEL_DIR}"

# Parser names both engines register for a model type (vLLM's ToolParserManager / ReasoningParserManager, SGLang's
# FunctionCallParser / ReasoningParser tables): (tool calls, reasoning).
PARSERS = {"kimi_k2": ("kimi_k2", "kimi_k2")}


@dataclass(frozen=True)
class Command:
    engine: str  # vllm, sglang, sglang+kt-kernel, ray
    layout: str  # the Layout's name it starts
    node: int | None  # the node it runs on (None: the only one)
    argv: tuple[str, ...]

    @property
    def shell(self) -> str:
        """The command to paste: shell-quoted, except that ${HEAD_IP} and ${MODEL_DIR} stay for the shell to fill."""
        return " ".join(_quote(a) for a in self.argv)


def _quote(arg: str) -> str:
    if "${" in arg and re.fullmatch(r"[\w${}:./@%+,-]+", arg):
        return f'"{arg}"'
    return shlex.quote(arg)


@dataclass(frozen=True)
class Target:
    """What the commands serve: the model reference the engines load, its served name, context, parsers."""
    model: str  # a Hugging Face id or a local folder, as the engines take it
    served_name: str
    context: int
    tool_parser: str | None
    reasoning_parser: str | None
    local: bool  # model is a folder here (else kt-kernel reads ${MODEL_DIR})


def target(model_ref: str, hub_id: str | None, cfg: ModelConfig, context: int, served_name: str | None) -> Target:
    """The engines' view of MODEL: a preset by its Hugging Face id, a folder by its path; served under the name
    `hybrid serve` would list (the folder's or the repository's last part) unless told otherwise."""
    folder = Path(model_ref)
    local = folder.is_dir()
    model = str(folder.resolve()) if local else (hub_id or model_ref)
    tool, reasoning = PARSERS.get(cfg.model_type, (None, None))
    if not _thinks(model, folder if local else None):
        reasoning = None
    return Target(model, served_name or Path(model).name, context, tool, reasoning, local)


def _thinks(model: str, folder: Path | None) -> bool:
    """A thinking model (its reasoning parser wanted): named so, or its folder's chat template writes <think>."""
    if "thinking" in model.lower():
        return True
    if folder is None:
        return False
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        path = folder / name
        if path.is_file() and "<think>" in path.read_text(errors="replace"):
            return True
    return False


def commands(layout: Layout, cluster: Cluster, t: Target) -> list[Command]:
    """The commands that start `layout` on `cluster`, in the order to run them."""
    head = cluster.head_ip or HEAD_IP
    if layout.engine == VLLM:
        return _vllm_dp(layout, cluster, t, head) if layout.expert_parallel else _vllm_tp(layout, cluster, t, head)
    return _sglang(layout, cluster, t, head)


def _vllm_common(t: Target) -> list[str]:
    out = ["--trust-remote-code", "--served-model-name", t.served_name, "--port", str(PORT),
           "--max-model-len", str(t.context)]
    if t.tool_parser:
        out += ["--enable-auto-tool-choice", "--tool-call-parser", t.tool_parser]
    if t.reasoning_parser:
        out += ["--reasoning-parser", t.reasoning_parser]
    return out


def _vllm_tp(layout: Layout, cluster: Cluster, t: Target, head: str) -> list[Command]:
    serve = ["vllm", "serve", t.model, "--tensor-parallel-size", str(layout.tp)] + _vllm_common(t)
    if cluster.nodes == 1:
        return [Command(VLLM, layout.name, None, tuple(serve))]
    # Past one node vLLM's tensor parallelism runs over a Ray cluster: started first, served from node 0.
    ray = [Command("ray", layout.name, 0, ("ray", "start", "--head", "--port", str(RAY_PORT)))]
    ray += [Command("ray", layout.name, k, ("ray", "start", "--address", f"{head}:{RAY_PORT}"))
            for k in range(1, cluster.nodes)]
    return ray + [Command(VLLM, layout.name, 0, tuple(serve + ["--distributed-executor-backend", "ray"]))]


def _vllm_dp(layout: Layout, cluster: Cluster, t: Target, head: str) -> list[Command]:
    # Moonshot's DP+EP command: every node runs its GPUs' share of the data-parallel ranks; node 0 serves the API,
    # the others run --headless from their first rank. Batch limits as the guide sets them.
    base = ["vllm", "serve", t.model, "--data-parallel-size", str(layout.dp), "--enable-expert-parallel",
            "--max-num-batched-tokens", "8192", "--max-num-seqs", "256",
            "--gpu-memory-utilization", str(layout.utilization)] + _vllm_common(t)
    if cluster.nodes == 1:
        return [Command(VLLM, layout.name, None, tuple(base))]
    g = cluster.node.gpus
    multi = ["--data-parallel-size-local", str(g), "--data-parallel-address", head,
             "--data-parallel-rpc-port", str(DP_RPC_PORT)]
    out = [Command(VLLM, layout.name, 0, tuple(base + multi))]
    out += [Command(VLLM, layout.name, k,
                    tuple(base + multi + ["--headless", "--data-parallel-start-rank", str(k * g)]))
            for k in range(1, cluster.nodes)]
    return out


def _sglang(layout: Layout, cluster: Cluster, t: Target, head: str) -> list[Command]:
    kt = layout.engine == SGLANG_KT
    path = t.model if t.local or not kt else MODEL_DIR  # kt-kernel reads the experts from a local folder
    base = ["python", "-m", "sglang.launch_server", "--model-path", path, "--tp-size", str(layout.tp),
            "--trust-remote-code", "--served-model-name", t.served_name, "--context-length", str(t.context),
            "--host", "0.0.0.0", "--port", str(PORT)]
    if t.tool_parser:
        base += ["--tool-call-parser", t.tool_parser]
    if t.reasoning_parser:
        base += ["--reasoning-parser", t.reasoning_parser]
    if kt:
        base += ["--kt-weight-path", path, "--kt-method", layout.kt_method, "--kt-threadpool-count",
                 str(cluster.node.numa_nodes), "--kt-num-gpu-experts", str(layout.gpu_experts)]
        if cluster.node.cores:
            base += ["--kt-cpuinfer", str(cluster.node.cores)]
    if cluster.nodes == 1:
        return [Command(layout.engine, layout.name, None, tuple(base))]
    multi = ["--dist-init-addr", f"{head}:{SGLANG_DIST_PORT}", "--nnodes", str(cluster.nodes)]
    return [Command(layout.engine, layout.name, k, tuple(base + multi + ["--node-rank", str(k)]))
            for k in range(cluster.nodes)]

