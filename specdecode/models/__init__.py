"""Target and draft models: the CausalLM protocol, the native Llama family, loaders."""
