"""Tool-using agents in OpenAI's `tools` / `tool_calls` format: the tool-call text format, an allow-listed
tool registry (an `ast` calculator, retrieval search, user tools by import path) and the agent loop."""
