"""`edgemoe serve`: an OpenAI-compatible HTTP server over one model (optional extra: pip install 'edgemoe[server]').

- scheduler.py: continuous batching; one worker thread owns the model and decodes all running requests together
- sequence.py: one request's decoding (sampling, penalties, stop strings, finish reason, JSON constraint)
- json_constraint.py: JSON / JSON-schema constrained decoding over the tokenizer's vocabulary
- openai_api.py: OpenAI request checking and response shaping (dicts; no web framework)
- tool_calls.py: tools through the model's chat template (Hermes-style <tool_call> blocks)
- app.py: the HTTP routes (Starlette), SSE streaming, API key; command.py: the `edgemoe serve` subcommand
"""
