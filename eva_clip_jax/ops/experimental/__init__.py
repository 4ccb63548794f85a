"""Attention kernels with no measurement behind them yet, selectable by name, never chosen by 'auto'.

flash_attention   'pallas_flash': Pallas flash attention with fused RoPE (Triton on GPU, Mosaic on TPU)
mosaic_attention  'mosaic': tokamax's Mosaic GPU flash attention on Hopper (tokamax optional)
"""
