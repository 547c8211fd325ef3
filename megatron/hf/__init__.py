"""Hugging Face export (tools/convert_to_hf.py) and its remote code.

- convert.py: a checkpoint -> a Hugging Face directory (stock GPT2LMHeadModel for dense models
  whose architecture maps exactly, else XMoEForCausalLM with remote code).
- from_hf.py: a Hugging Face GPT-2 directory -> a weights-only checkpoint of ours.
- gpt2.py: the exact correspondence between xmoe's dense GPT and transformers' GPT-2.
- configuration_xmoe.py, modeling_xmoe.py: the remote code copied into exported directories
  (standalone: torch and transformers only, never megatron).

Nothing here is imported by `import megatron`; transformers and safetensors are the "hf" extra.
"""
