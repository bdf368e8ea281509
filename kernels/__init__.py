"""Triton kernels with PyTorch references, attention dispatch and ``apply_kernels``.

Not built yet: lands with issue 3 (see README, "Status"). The model runs on plain PyTorch
(``torch.nn.functional.scaled_dot_product_attention``) until then.
"""
