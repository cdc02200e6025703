"""The control plane: request lifecycle, KV page ownership and scheduling. Pure Python: it
imports no torch and never sees a tensor. Public surface: Scheduler (submit, abort,
next_plan, advance) and the message types in plan.py."""
