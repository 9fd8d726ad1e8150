"""Writing our trained drafters in other engines' formats: the distilled draft model as a
llama.cpp GGUF (gguf.py), the EAGLE head as a `speculators` folder for vLLM (speculators.py);
`specdecode export` (commands.py)."""
