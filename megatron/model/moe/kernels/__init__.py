"""Raw Triton kernels of the MoE layer and their launchers (importing any of them needs triton):
rows.py (gather, GeLU with the expert bias, per-token combine, their backwards, per-expert
sums), capacity.py (capacity and the dispatch rows without a sort), router_gemm.py (fp32-accurate
router logits on bf16 tensor cores) and gelu.py (the GeLU forms inside kernels). The autograd
Functions over them are in ../ops.py; whether they run at all is decided in ../backend.py.
"""
