"""Making a trained model cheaper to train further or to serve: LoRA adapters (lora.py, in PEFT's format),
4-bit bases (nf4.py), weight quantization (quantize.py), GGUF files for llama.cpp (gguf.py). Section dataclasses live in config.py, torch-free, so `--help` imports no torch."""
