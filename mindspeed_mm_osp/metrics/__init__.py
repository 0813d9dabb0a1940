"""Full-reference video quality metrics (VAE reconstruction checks)."""

from .quality import SSIM_DEFINITION, luma_bt601, psnr, ssim, ssim_per_frame

__all__ = ["SSIM_DEFINITION", "luma_bt601", "psnr", "ssim", "ssim_per_frame"]
