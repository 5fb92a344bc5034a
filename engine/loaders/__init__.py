"""Weight and tokenizer loaders: Hugging Face safetensors directories, GGUF files, dummy presets."""
