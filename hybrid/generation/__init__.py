"""Stage 4, generation: opening a model (runtime.py), prefill/decode and sampling, tokenizers, chat templates, tool calls, the chat session, the serving engine and the profiler's measuring."""
