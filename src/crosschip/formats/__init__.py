"""Number formats and their on-disk layouts, below every stage: what a stored tensor means, how to encode and decode it.

  quant     the codecs: FP8 block scaling, INT8 per-channel, the fp16 range audit, error measures
  layouts   where each format's tensors and scales live in a checkpoint (DeepSeek-V3, compressed-tensors,
            vllm-ascend), and how `config.json` names it
  policy    which tensors a format leaves in high precision (embeddings, norms, lm_head, routers)

The checkpoint loader (`crosschip.checkpoint.load_model` dequantizes), `convert`, `check` and `verify` all use them;
this package imports nothing of theirs.
"""
