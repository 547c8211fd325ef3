"""Data pipeline: Megatron's memory-mapped indexed dataset (`.bin` + `.idx`) and its tools."""
