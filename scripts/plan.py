"""Moved: the run planner is `python -m train.plan` (its library, llama_jax.planner)."""
from llama_jax.cli import moved

if __name__ == "__main__":
    moved("python scripts/plan.py", "python -m train.plan")
