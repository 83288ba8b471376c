"""llmcycle: the whole life of a language model in one Python package."""

from llmcycle.threads import openmp_env

# Before anything imports torch (and so loads its OpenMP runtime): threads that yield a busy core.
openmp_env()

__version__ = "0.1.0"
