"""llmcycle: the whole life of a language model in one Python package."""

__version__ = "0.1.0"
