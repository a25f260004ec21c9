"""Random-weight models at real sizes for GPU timing: FLUX.1 (11.9 B) and an SDXL-sized UNet (2.6 B), bf16."""

import torch


def _build(factory, device):
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return factory().eval()
    finally:
        torch.set_default_dtype(torch.float32)


def flux_transformer(device="cuda"):
    from diffusers import FluxTransformer2DModel

    return _build(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)), device)


def sdxl_unet(device="cuda"):
    from diffusers import UNet2DConditionModel

    return _build(lambda: UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, layers_per_block=2), device)


def sdxl_inputs(device="cuda", size=128, batch=2):
    """A CFG-batched SDXL call at `size` latent cells (128 = 1024 px)."""
    bf16 = dict(device=device, dtype=torch.bfloat16)
    return dict(sample=torch.randn(batch, 4, size, size, **bf16), timestep=torch.tensor([500.0], device=device),
                encoder_hidden_states=torch.randn(batch, 77, 2048, **bf16),
                added_cond_kwargs={"text_embeds": torch.randn(batch, 1280, **bf16),
                                   "time_ids": torch.randn(batch, 6, **bf16)}, return_dict=False)


def flux_inputs(device="cuda", px=1024, n_text=512):
    """One FLUX.1 call at `px`² pixels (16 px per token) with `n_text` T5 tokens."""
    side = px // 16
    bf16 = dict(device=device, dtype=torch.bfloat16)
    rows, cols = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)
    return dict(hidden_states=torch.randn(1, side * side, 64, **bf16),
                encoder_hidden_states=torch.randn(1, n_text, 4096, **bf16),
                pooled_projections=torch.randn(1, 768, **bf16), timestep=torch.tensor([0.5], **bf16),
                guidance=torch.tensor([3.5], **bf16), img_ids=ids.to(device),
                txt_ids=torch.zeros(n_text, 3, device=device), return_dict=False)
