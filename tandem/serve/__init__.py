"""The HTTP server: OpenAI- and Ollama-compatible APIs and a web chat page over the one Engine.

Data path of a request: uvicorn -> middleware (guard: host/origin/errors, API key, body size,
metrics) -> route (openai_api.py / ollama_api.py: validate JSON into pydantic models) ->
ServedModel (model.py: chat template, SamplingParams) -> runtime.AsyncEngine (the Engine in its
own thread) -> StepOutputs -> ReasoningSplitter (<think> -> reasoning) -> JSON, SSE or NDJSON.
`create_app(llm, settings)` in app.py builds everything; nothing happens at import.
"""
