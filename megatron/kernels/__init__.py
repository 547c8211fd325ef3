"""Raw Triton kernels outside the MoE layer (importing any of them needs triton): the language
model's fused output-layer cross-entropy and the master-weight AdamW step. The MoE layer's own
kernels are in megatron/model/moe/kernels/. On CPU they run only under triton's interpreter
(TRITON_INTERPRET=1, the tests)."""
