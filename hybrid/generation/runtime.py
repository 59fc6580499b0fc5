"""Opening a model once: the checkpoint, its plan, tokenizer, chat template and generation_config.json are
read and checked here, the weights loaded, and everything the front ends need comes back in one frozen
Runtime. generate, chat, serve, profile and the benchmarks all start from `open_runtime`; nothing reads
settings off the model.

What a Runtime decides, each in one place:
- context limit: the plan's context_length (the cache memory it reserved); without a plan the model's
  max_position_embeddings, capped at NO_PLAN_CONTEXT (that path is the plain fp32 torch model of tests and
  tiny checkpoints, not something to size for 256K positions);
- prefill chunk: the plan's prefill_chunk, else generate.DEFAULT_PREFILL_CHUNK;
- whether the model thinks (writes a <think> block before its answer: hybrid.generation.reasoning.thinks);
- sampling defaults: generation_config.json's temperature/top_p/top_k (do_sample false: greedy), else 1.0 for
  a thinking model (K2-Thinking's recommendation) and K2's 0.6 for other kimi_k2 checkpoints (a K2 GGUF: Unsloth's temperature 0.6, min_p 0.01); a request's or a flag's
  values override them (`sampling`);
- stop ids: the eos ids of config.json and generation_config.json, plus <|im_end|> when the tokenizer has it;
- the attention device, where caches are built;
- with `threads`, the process's CPU thread budget: torch's share and the kernel worker's (generation/threads.py).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from hybrid.generation.chat_template import ChatTemplate, chat_template_for, k2_template
from hybrid.read.checkpoint import Checkpoint
from hybrid.read.gguf import GGUFCheckpoint
from hybrid.read.open import open_checkpoint
from hybrid.read.config import read_json_object
from hybrid.errors import ConfigError, GenerationError
from hybrid.generation.generate import DEFAULT_PREFILL_CHUNK, new_cache
from hybrid.generation.reasoning import thinks
from hybrid.run.kv_cache import MLACache
from hybrid.run.loader import cache_device, load_model
from hybrid.generation.sampling import SamplingParams
from hybrid.generation.threads import torch_threads, use_threads
from hybrid.generation.tokenizer import TiktokenTokenizer, Tokenizer

NO_PLAN_CONTEXT = 16384
K2_DEFAULT_TEMPERATURE = 0.6  # Moonshot's recommendation for Kimi-K2-Instruct
THINKING_DEFAULT_TEMPERATURE = 1.0  # Moonshot's recommendation for Kimi-K2-Thinking
UNSLOTH_K2_SAMPLING = {"temperature": 0.6, "min_p": 0.01}  # Unsloth's K2 GGUF card (GGUFs carry no generation config)


@dataclass(frozen=True)
class Runtime:
    folder: Path
    model: torch.nn.Module  # a loaded DeepseekV3ForCausalLM
    plan: object | None  # the placement.plan.Plan applied, or None (plain torch)
    tokenizer: Tokenizer | None
    template: ChatTemplate | None  # None: the checkpoint has none and is not K2's tokenizer
    sampling_defaults: dict = field(default_factory=dict)
    stop_ids: frozenset = frozenset()
    max_context: int = 0
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    thinking: bool = False  # the model writes <think>...</think> before its answer (hybrid.generation.reasoning)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Where caches live: the plan's cache_device (the attention's device), the CPU without a plan."""
        return cache_device(self.plan)

    def sampling(self, temperature=None, top_p=None, top_k=None, min_p=None, seed=None,
                 max_new_tokens: int = 64) -> SamplingParams:
        """SamplingParams: the values given (None: not given) over the checkpoint's defaults."""
        given = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p}
        values = self.sampling_defaults | {k: v for k, v in given.items() if v is not None}
        return SamplingParams(seed=seed, max_new_tokens=max_new_tokens, **values)

    def chat_template(self) -> ChatTemplate:
        """The template chat and serve render with; one ConfigError when the checkpoint has none."""
        return require_chat(self.folder, self.tokenizer, self.template)

    def new_cache(self, n_positions: int, batch: int = 1) -> MLACache:
        """A cache on the attention device; refuses more positions than the context limit."""
        if n_positions > self.max_context:
            why = "the plan's context_length" if self.plan is not None else "the model's limit"
            raise GenerationError(f"context overflow: {n_positions} positions requested, the limit is "
                                  f"{self.max_context} ({why})")
        return new_cache(self.model, n_positions, batch, self.device)


def open_runtime(folder, plan=None, store=None, progress=None, needs_chat: bool = False,
                 threads: int | None = None) -> Runtime:
    """Open the checkpoint at `folder` and load it as `plan` says: a Plan (plan_for_this_machine's, what the
    front ends use without --plan), a plan file path, or None (the plain fp32 torch reference model).
    `store`: a converted expert store. Every file is read and
    checked before any weight is loaded, the tokenizer and chat template too when `needs_chat` (chat, serve).
    progress(done, total) follows the load. `threads`: the process's CPU thread budget (hybrid.generation.threads:
    torch's pool is set to its share, the kernel worker gets it in place of the plan's cpu_threads); None leaves
    torch as it is and the plan as written."""
    ckpt = folder if isinstance(folder, (Checkpoint, GGUFCheckpoint)) else open_checkpoint(folder)
    folder = Path(ckpt.folder)
    if plan is not None and not hasattr(plan, "settings"):
        from placement.plan_file import load_checked_plan

        plan = load_checked_plan(plan, ckpt.config, threads=threads)
    if threads is not None:
        plan = use_threads(plan, threads)
    if store is None and plan is not None:
        store = plan.settings.expert_store  # a plan may name its store: --store is then not needed
    if isinstance(ckpt, GGUFCheckpoint):
        tokenizer, template, sampling = gguf_chat_parts(ckpt)
        generation = {}  # a GGUF has no generation_config.json
    else:
        tokenizer = Tokenizer.from_folder(folder)
        template = chat_template_for(folder, tokenizer, required=False) if tokenizer is not None else None
        generation = read_generation_config(folder)
        sampling = default_sampling(generation, ckpt.config.model_type, thinks(template, tokenizer))
    if needs_chat:
        require_chat(folder, tokenizer, template)  # its one line before minutes of loading
    model = load_model(ckpt, plan=plan, store=store, progress=progress)
    if threads is not None:
        torch.set_num_threads(torch_threads(plan, threads))  # its share while the kernels run too
    cfg = ckpt.config
    if plan is not None:
        max_context, chunk = plan.settings.context_length, plan.settings.prefill_chunk or DEFAULT_PREFILL_CHUNK
    else:
        max_context, chunk = min(cfg.max_position_embeddings, NO_PLAN_CONTEXT), DEFAULT_PREFILL_CHUNK
    return Runtime(folder, model, plan, tokenizer, template, sampling,
                   frozenset(stop_ids(generation, cfg, tokenizer)), max_context, chunk, thinks(template, tokenizer))


def gguf_chat_parts(ckpt: GGUFCheckpoint) -> tuple[Tokenizer | None, ChatTemplate | None, dict]:
    """What a GGUF file set holds for chat: K2's tokenizer rebuilt from its token list, the template from
    `tokenizer.chat_template` (K2's packaged one when it has none), and, having no generation_config.json,
    Unsloth's recommended sampling for K2. A tokenizer other than K2's gives no tokenizer (generate
    --prompt-ids still runs; chat and serve say why they cannot)."""
    try:  # the token list is parsed once, for the tokenizer and the template alike
        ranks, special, special_map, text = ckpt.tokenizer_pieces()
    except ConfigError:
        return None, None, {}
    tokenizer = TiktokenTokenizer.from_pieces(Path(ckpt.folder).name, ranks, special, special_map)
    template = (ChatTemplate({"default": text}, f"{ckpt.folder} (GGUF tokenizer.chat_template)",
                             tokenizer.special_tokens_map) if text else k2_template(tokenizer.special_tokens_map))
    return tokenizer, template, dict(UNSLOTH_K2_SAMPLING) if ckpt.config.model_type == "kimi_k2" else {}


def require_chat(folder, tokenizer, template) -> ChatTemplate:
    """What chat and serve need of a checkpoint: a tokenizer and a chat template, or one ConfigError."""
    if tokenizer is None:
        raise ConfigError(f"{folder}: no tokenizer (tiktoken.model or tokenizer.json), which chat and serve need")
    return template or chat_template_for(folder, tokenizer)


def plan_for_this_machine(ckpt: Checkpoint, store=None, request=None, hw=None):
    """The planner's PlanResult for this machine (`hw`, default: as detected by placement.resolve) with
    `request`'s settings (a placement PlanRequest; default: the planner's), in the expert format of `store`
    when one is given (its experts are already quantized), else the nearest format to the request's that the
    model's widths divide. Raises PlanError when nothing fits."""
    from dataclasses import replace

    from placement.memory import fitting_format
    from placement.planner import PlanRequest, make_plan
    from placement.resolve import resolve_hardware

    request = request or PlanRequest()
    if store is not None:
        from hybrid.read.expert_store import read_store_manifest

        fmt = read_store_manifest(store)["format"]
    else:
        fmt = fitting_format(ckpt.config, request.expert_format or "int4") or request.expert_format
    return make_plan(ckpt.config, str(ckpt.folder), hw or resolve_hardware(), replace(request, expert_format=fmt))


def plan_summary(plan) -> str:
    """One line for a front end to show what a plan does."""
    s = plan.settings
    devices = sorted({r.device for r in plan.rules if r.kernel != "cpu_moe"})
    return (f"routed experts {s.expert_format} on {s.cpu_threads} CPU threads, the rest on {', '.join(devices)}; "
            f"context {s.context_length}, cache on {plan.cache_device}")


def read_generation_config(folder) -> dict:
    """generation_config.json as a dict ({} when the checkpoint has none)."""
    return read_json_object(Path(folder) / "generation_config.json", missing_ok=True)


def default_sampling(generation: dict, model_type: str, thinking: bool = False) -> dict:
    """Sampling defaults: generation_config.json's temperature/top_p/top_k when it sets them, else 1.0 for a
    thinking model and K2's 0.6 for other kimi_k2 checkpoints."""
    out = {k: generation[k] for k in ("temperature", "top_p", "top_k")
           if isinstance(generation.get(k), (int, float)) and not isinstance(generation.get(k), bool)}
    if "temperature" not in out and thinking:
        out["temperature"] = THINKING_DEFAULT_TEMPERATURE
    if "temperature" not in out and model_type == "kimi_k2":
        out["temperature"] = K2_DEFAULT_TEMPERATURE
    if generation.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def stop_ids(generation: dict, config, tokenizer=None) -> set[int]:
    """eos ids of config.json and generation_config.json, plus the chat end marker <|im_end|> when known."""
    ids = set(config.eos_token_ids)
    eos = generation.get("eos_token_id")
    ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.token_id("<|im_end|>") is not None:
        ids.add(tokenizer.token_id("<|im_end|>"))
    return ids
