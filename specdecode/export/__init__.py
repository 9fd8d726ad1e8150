"""Writing our trained drafters in other engines' formats: the distilled draft model as a
llama.cpp GGUF (gguf.py), the EAGLE head as a `speculators` folder for vLLM and back
(speculators.py), what they read of the target (target.py); `specdecode export` (commands.py).
What maps, what differs and what was validated: docs/export.md."""
