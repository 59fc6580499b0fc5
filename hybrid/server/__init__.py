"""`hybrid serve`: OpenAI- and Anthropic-compatible HTTP server over the continuous-batching engine.

app.py builds the ASGI app (auth, limits, errors, health, the chat page chat.html) and binds the port;
openai_routes.py and anthropic_routes.py map each wire format onto service.py, which renders the chat template,
runs requests through the engine and turns K2's output (text and tool-call sections) into messages;
observe.py writes the per-request log line and keeps the Prometheus registry behind /metrics."""
