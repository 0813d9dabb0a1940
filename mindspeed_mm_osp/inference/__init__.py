"""Text-to-video inference: pipeline stages, predictor weight loading, benchmark timing, video files."""
