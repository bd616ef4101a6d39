"""What users run: batch generation, fine-tuning, schedules, and the `sd3` command line."""
