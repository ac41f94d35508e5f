"""Build a tiny DeepSeek-V3 multimodal model, run it on an image, generate, save and reload it.

python examples/quickstart.py [--output ./outputs/quickstart]
"""

import argparse

import torch
from transformers import AutoModel

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--output", default="./outputs/quickstart")
output_dir = parser.parse_args().output

config = DeepseekV3MultimodalConfig(
    vocab_size=1000, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_group=2, topk_group=1,
    num_experts_per_tok=2, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
    v_head_dim=16, first_k_dense_replace=1, use_attention_gate=True,
    use_image_input=True, image_size=32, patch_size=8, image_token_id=5,
)  # fmt: skip
model = DeepseekV3MultimodalForConditionalGeneration(config).eval()
input_ids = torch.tensor([[1] + [5] * config.num_image_tokens + [42, 43]])  # BOS, 16 image patches, 2 text tokens
pixel_values = torch.randn(1, 3, 32, 32)
out = model(input_ids=input_ids, pixel_values=pixel_values, output_gate_values=True)
print("logits", tuple(out.logits.shape), "gate values per layer", tuple(out.gate_values[0].shape))
print("generated", model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=5)[0, -5:].tolist())
model.save_pretrained(output_dir)
print("reloaded", type(AutoModel.from_pretrained(output_dir)).__name__)
