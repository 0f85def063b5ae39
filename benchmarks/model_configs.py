"""Layer-shape configs of real denoisers, from their diffusers ``config.json`` on the Hugging Face hub
(only the values that set layer shapes), shared by the benchmarks that build them with random
weights offline: ``sd15_size.py`` (bytes) and ``e2e_step.py`` (step latency).

* ``runwayml/stable-diffusion-v1-5`` ``unet/config.json``
* ``stabilityai/stable-diffusion-xl-base-1.0`` ``unet/config.json``
* ``black-forest-labs/FLUX.1-dev`` ``transformer/config.json``
* ``stabilityai/stable-diffusion-3-medium-diffusers`` ``transformer/config.json``
* ``PixArt-alpha/PixArt-XL-2-1024-MS`` ``transformer/config.json``
"""

SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "norm_num_groups": 32,
}  # fmt: skip
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), "norm_num_groups": 32,
}  # fmt: skip
FLUX_DIT = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}  # fmt: skip
SD3_MEDIUM_DIT = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
}  # fmt: skip
PIXART_ALPHA_DIT = {
    "sample_size": 128, "patch_size": 2, "in_channels": 4, "out_channels": 8, "num_layers": 28,
    "attention_head_dim": 72, "num_attention_heads": 16, "cross_attention_dim": 1152, "caption_channels": 4096,
    "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6, "num_embeds_ada_norm": 1000,
    "attention_bias": True, "activation_fn": "gelu-approximate", "use_additional_conditions": True,
}  # fmt: skip
