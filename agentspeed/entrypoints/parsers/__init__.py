"""Model output -> structured events, shared by every API (chat, messages, responses).

reasoning.py   <think>...</think> splitting (--reasoning-parser)
tool_parsers.py / tool_parsers_tokens.py   tool-call formats (--tool-call-parser)
output.py      the pipeline: text deltas in, Reasoning/Text/ToolCallStart/ToolCallArgs out
"""
