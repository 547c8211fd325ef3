"""xmoe: GPT pretraining with XMoE (threshold-routed, fine-grained) mixture-of-experts layers.

Importing the package is cheap and torch-free: data tools (tokenizer, indexed datasets,
preprocessing) run without torch; model code imports torch in its own modules.
"""

__version__ = "0.1.0"
