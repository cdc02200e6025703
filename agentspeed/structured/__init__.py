"""Structured output: constraints compiled by a grammar library into token matchers.

backend.py states the one small interface every backend keeps (compile once, fill a token
bitmask per step, accept tokens, roll back); xgrammar_backend.py and guidance_backend.py
implement it over xgrammar and llguidance (we write no grammar engine); manager.py compiles
and caches on the engine side; bitmask.py applies the masks in the sampler.
"""
