"""Measures: detection metrics (AUC, TPR at FPR, thresholds), their plots, image similarity (SSCD, CLIP, SSIM)."""
