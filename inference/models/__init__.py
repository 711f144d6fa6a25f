"""Built-in models: classical image analysis written in torch, no downloaded weights."""
